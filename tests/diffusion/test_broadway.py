"""BroadWay on tiny config-built AnimateDiff and TextToVideoSD pipelines, against a numpy re-derivation of the
README's algorithm (the spec's formulas: energies on the ``reshape(2, -1, heads, F, F)[-1]`` half, the explicit
FFT band ``[F//2 - tau, F//2 + tau]``, ``beta* = max(beta, sqrt((E1 - E2_l) / E2_h))``, real part, row
renormalisation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusers  # noqa: E402,F401  (the dev extra installs it: a missing one must fail, not skip)

from mmattn.diffusion.broadway import (  # noqa: E402
    BroadWayAttnProcessor,
    BroadWayConfig,
    apply_broadway,
    broadway,
    broadway_enabled,
    broadway_temporal_maps,
    disable_broadway,
    enable_broadway,
    high_band_projector,
    high_frequency_band,
    remove_broadway,
)
from mmattn.diffusion.testing import tiny_animatediff_pipeline, tiny_text_to_video_pipeline  # noqa: E402

FRAMES = 8
STEPS = 2
CALL = dict(prompt="a dog running on the beach", num_frames=FRAMES, height=16, width=16,
            num_inference_steps=STEPS, output_type="pt")
# tau=3 is "all but DC" for 8 frames; stop=0.5 makes step 0 of 2 active and leaves step 1 to the pass-through path.
CONFIG = dict(tau=3, stop=0.5)


# ------------------------------------------------------------------------------------------ numpy re-derivation


def numpy_broadway(a, ref, alpha, beta, tau, chunks, clamp=False):
    """a, ref: [rows, F, F] in diffusers' row order (batch, y, x, head); the README's steps, in float64."""
    a = a.astype(np.float64)
    frames = a.shape[-1]

    def energy(x):  # the README: square, mean over heads, mean over queries, sum over keys, mean over positions
        half = x.reshape(chunks, -1, x.shape[-2], frames)[-1 if chunks > 1 else 0]
        return (half**2).sum(-1).mean()

    e1 = energy(a)
    a2 = a + alpha * (ref - a) if ref is not None else a
    spectrum = np.fft.fft(a2, axis=-1)
    band = np.arange(frames // 2 - tau, frames // 2 + tau + 1)
    assert len(band) == 2 * tau + 1 and 0 not in band
    low = np.setdiff1d(np.arange(frames), band)
    power = np.abs(spectrum.reshape(chunks, -1, frames, frames)[-1 if chunks > 1 else 0]) ** 2 / frames
    e_high, e_low = power[..., band].sum(-1).mean(), power[..., low].sum(-1).mean()
    beta_star = max(beta, np.sqrt(max(e1 - e_low, 0) / e_high))
    spectrum[..., band] *= beta_star
    out = np.fft.ifft(spectrum, axis=-1).real
    if clamp:
        out = np.maximum(out, 0)
    return out / out.sum(-1, keepdims=True), beta_star


def nearest_resize(ref, src_hw, dst_hw):
    """[B, H1, W1, ...] -> [B, H, W, ...] with index floor(y * H1 / H) (torch's legacy 'nearest')."""
    ys = (np.arange(dst_hw[0]) * src_hw[0]) // dst_hw[0]
    xs = (np.arange(dst_hw[1]) * src_hw[1]) // dst_hw[1]
    return ref[:, ys][:, :, xs]


def random_maps(shape, seed=0, sharpness=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * sharpness).softmax(-1).float()


# ------------------------------------------------------------------------------------------ the arithmetic


def test_band_and_tau():
    assert high_frequency_band(16, 7).nonzero().flatten().tolist() == list(range(1, 16))
    assert high_frequency_band(24, 7).nonzero().flatten().tolist() == list(range(5, 20))
    assert high_frequency_band(8, "all_but_dc").nonzero().flatten().tolist() == list(range(1, 8))
    odd = high_frequency_band(15, 7)
    assert not odd[0] and odd[1:].all()  # conjugate-symmetric, DC excluded
    assert high_frequency_band(15, 2).nonzero().flatten().tolist() == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="at least 16 frames"):
        high_frequency_band(8, 7)


@pytest.mark.parametrize("tau", [2, 3, 5, 7])
def test_projector_is_the_fft_filter(tau):
    band = high_frequency_band(16, tau)
    rows = random_maps((5, 16))
    via_fft = torch.fft.ifft(torch.fft.fft(rows, dim=-1) * band, dim=-1).real
    torch.testing.assert_close(rows @ high_band_projector(band), via_fft, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tau", [2, 5, 7])
@pytest.mark.parametrize("scope", ["batch", "per_sample"])
@pytest.mark.parametrize("clamp", [False, True])
def test_closed_form_and_fft_agree(tau, scope, clamp):
    probs = random_maps((2, 3, 6, 2, 16, 16), seed=1)
    ref = random_maps((2, 3, 6, 1, 16, 16), seed=2)
    kwargs = dict(alpha=0.6, beta=1.5, tau=tau, cond_chunk=1, energy_scope=scope, clamp_negative=clamp)
    closed, s1 = broadway_temporal_maps(probs, ref, fme_path="closed_form", **kwargs)
    fft, s2 = broadway_temporal_maps(probs, ref, fme_path="fft", **kwargs)
    torch.testing.assert_close(closed, fft, atol=2e-6, rtol=0)
    for key in s1:
        torch.testing.assert_close(s1[key], s2[key], atol=1e-6, rtol=1e-5)
    assert not torch.equal(closed, probs)


@pytest.mark.parametrize("tau,clamp", [(7, False), (7, True), (3, False), (5, False)])
def test_maps_match_numpy_rederivation(tau, clamp):
    chunks, videos, positions, heads, frames = 2, 2, 6, 3, 16
    probs = random_maps((chunks, videos, positions, heads, frames, frames), seed=3)
    ref = random_maps((chunks, videos, positions, heads, frames, frames), seed=4)
    ours, stats = broadway_temporal_maps(probs, ref, alpha=0.6, beta=1.5, tau=tau, cond_chunk=1,
                                         clamp_negative=clamp)
    expected, beta_star = numpy_broadway(probs.reshape(-1, frames, frames).numpy(),
                                         ref.reshape(-1, frames, frames).numpy().astype(np.float64),
                                         0.6, 1.5, tau, chunks, clamp)
    np.testing.assert_allclose(ours.reshape(-1, frames, frames).numpy(), expected, atol=2e-6)
    assert float(stats["beta_star"]) == pytest.approx(beta_star, rel=1e-5)


def test_closed_form_identities():
    """Spec §2.2.5/§2.2.8: E2_l = 1/F and FME = u + beta*(A2 - u) at F=16, tau=7; E3 >= E1; the band split sums."""
    probs = random_maps((1, 4, 5, 2, 16, 16), seed=5)
    ref = random_maps((1, 4, 5, 2, 16, 16), seed=6)
    out, stats = broadway_temporal_maps(probs, ref, alpha=0.6, beta=1.5, tau=7, fme_path="fft")
    assert float(stats["E2_low"]) == pytest.approx(1 / 16, rel=1e-5)
    assert float(stats["E2_low"] + stats["E2_high"]) == pytest.approx(float(stats["E2"]), rel=1e-6)
    blended = probs + 0.6 * (ref - probs)
    torch.testing.assert_close(out, 1 / 16 + stats["beta_star"] * (blended - 1 / 16), atol=2e-6, rtol=0)
    energy_out = out.square().sum(-1).mean()
    assert float(energy_out) >= float(stats["E1"]) - 1e-6
    torch.testing.assert_close(out.sum(-1), torch.ones_like(out.sum(-1)))
    # For a narrower band, the edit is a right-multiplication by a symmetric circulant M: (A2 M) V = A2 (M V).
    _, s = broadway_temporal_maps(probs, ref, alpha=0.6, beta=1.5, tau=3)
    band = high_frequency_band(16, 3)
    m = torch.eye(16) + (s["beta_star"] - 1) * high_band_projector(band)
    torch.testing.assert_close(m, m.T)
    narrow, _ = broadway_temporal_maps(probs, ref, alpha=0.6, beta=1.5, tau=3)
    torch.testing.assert_close(narrow, blended @ m, atol=2e-6, rtol=0)
    values = torch.randn(16, 4)
    torch.testing.assert_close(narrow @ values, blended @ (m @ values), atol=1e-5, rtol=0)


def test_degenerate_maps_stay_finite():
    uniform = torch.full((1, 1, 3, 2, 16, 16), 1 / 16)
    out, stats = broadway_temporal_maps(uniform, None, alpha=0.6, beta=1.5, tau=7)
    assert torch.isfinite(out).all() and float(stats["beta_star"]) == 1.5
    torch.testing.assert_close(out, uniform)
    sharp = random_maps((1, 1, 3, 2, 16, 16), sharpness=50.0)
    _, capped = broadway_temporal_maps(sharp, uniform, alpha=0.9, beta=1.5, tau=7, beta_max=2.0)
    assert 1.5 <= float(capped["beta_star"]) <= 2.0


def test_config_presets_and_validation():
    assert BroadWayConfig.animatediff().to_dict() == BroadWayConfig().to_dict()
    vc2 = BroadWayConfig.videocrafter2()
    assert (vc2.tau, vc2.alpha, vc2.beta, vc2.start, vc2.stop) == (7, 0.1, 10.0, 0.0, 0.2)
    assert BroadWayConfig.from_dict(vc2.to_dict()) == vc2
    for bad in (dict(energy_scope="video"), dict(tau=-1), dict(stop=1.5), dict(cfg_layout=0), dict(beta=0)):
        with pytest.raises(ValueError):
            BroadWayConfig(**bad)
    with pytest.raises(ValueError, match="unknown BroadWay preset"):
        BroadWayConfig.from_preset("cogvideox")


# ------------------------------------------------------------------------------------------ tiny pipelines


@pytest.fixture(scope="module")
def animatediff():
    return tiny_animatediff_pipeline()


@pytest.fixture(scope="module")
def t2v():
    return tiny_text_to_video_pipeline()


@pytest.fixture(params=["animatediff", "t2v"])
def pipe(request):
    return request.getfixturevalue(request.param)


_VANILLA: dict[int, torch.Tensor] = {}


def run(pipe, seed=0, **overrides):
    return pipe(**{**CALL, **overrides}, generator=torch.Generator().manual_seed(seed)).frames


def vanilla_of(pipe):
    """The plain pipeline's output for CALL, computed once per pipeline (tests keep the pipelines unpatched)."""
    if id(pipe) not in _VANILLA:
        _VANILLA[id(pipe)] = run(pipe)
    return _VANILLA[id(pipe)]


def test_identity_and_bit_identical_restore(pipe):
    processors = dict(pipe.unet.attn_processors)
    vanilla = vanilla_of(pipe)
    with broadway(pipe, BroadWayConfig(alpha=0.0, beta=1.0, **CONFIG)) as handle:
        assert broadway_enabled(pipe)
        wrapped = [n for n, p in pipe.unet.attn_processors.items() if isinstance(p, BroadWayAttnProcessor)]
        assert len(wrapped) == 12 and all(n.startswith(("up_blocks.1", "up_blocks.2", "up_blocks.3")) for n in wrapped)
        identity = run(pipe)
        assert (handle.state.calls, handle.state.active_calls) == (2, 1)
    torch.testing.assert_close(identity, vanilla, atol=1e-5, rtol=0)
    assert not broadway_enabled(pipe)
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())
    assert torch.equal(run(pipe), vanilla)


def test_pipeline_maps_match_rederivation(pipe):
    """Every edited layer of both CFG halves equals the numpy steps applied to its vanilla map and up_blocks.1's."""
    config = BroadWayConfig(alpha=0.6, beta=1.5, **CONFIG)
    vanilla = vanilla_of(pipe)
    with broadway(pipe, config) as handle:
        handle.record_maps = True
        edited_video = run(pipe)
    assert not torch.allclose(edited_video, vanilla, atol=1e-4)  # the method acts
    assert len(handle.maps) == 12  # one active step, twelve layers
    for (call, name), rec in handle.maps.items():
        assert rec["chunks"] == 2  # CFG detected
        stage, key = ".".join(name.split(".")[:2]), ".".join(name.split(".")[2:])
        ref_rec = handle.maps[(call, f"up_blocks.1.{key}")]
        a, r = rec["vanilla"].numpy(), ref_rec["vanilla"].numpy().astype(np.float64)
        chunks, videos, _, heads, frames, _ = a.shape
        (h, w), (h1, w1) = rec["hw"], ref_rec["hw"]
        r = r.reshape(chunks * videos, h1, w1, r.shape[3], frames, frames)
        if r.shape[3] != heads:
            r = r.mean(3, keepdims=True).repeat(heads, axis=3)
        r = nearest_resize(r, (h1, w1), (h, w))
        expected, _ = numpy_broadway(a.reshape(-1, frames, frames), r.reshape(-1, frames, frames), 0.6, 1.5,
                                     3, chunks)
        if stage == "up_blocks.1":
            assert (h, w) == (h1, w1)
        np.testing.assert_allclose(rec["edited"].numpy().reshape(-1, frames, frames), expected, atol=3e-6,
                                   err_msg=name)


def unet_call(pipe, batch=2, seed=0):
    """One denoiser call at the first timestep, on a CFG-shaped batch (identical latent halves)."""
    unet, scheduler = pipe.unet, pipe.scheduler
    scheduler.set_timesteps(5)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, FRAMES, 16, 16, generator=g).repeat(batch, 1, 1, 1, 1)
    repeat = FRAMES if type(unet).__name__ == "UNetMotionModel" else 1  # AnimateDiff repeats text per frame
    text = torch.randn(batch, 16, 16, generator=g).repeat_interleave(repeat, 0)
    return unet(latents, scheduler.timesteps[0], encoder_hidden_states=text).sample


def test_fft_path_matches_closed_form_in_unet(animatediff):
    with broadway(animatediff, BroadWayConfig(fme_path="fft", **CONFIG)):
        fft = unet_call(animatediff)
    with broadway(animatediff, BroadWayConfig(fme_path="closed_form", **CONFIG)):
        closed = unet_call(animatediff)
    torch.testing.assert_close(fft, closed, atol=1e-5, rtol=0)
    assert not torch.allclose(closed, unet_call(animatediff), atol=1e-4)


def test_explicit_attn_processor_and_no_cfg(t2v):
    """The wrapper also drives AttnProcessor (probs @ V by bmm); without CFG the batch is one chunk."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    t2v.unet.set_attn_processor(AttnProcessor())
    try:
        with broadway(t2v, BroadWayConfig(**CONFIG)) as handle:
            handle.record_maps = True
            explicit = run(t2v, guidance_scale=1.0)
        assert {rec["chunks"] for rec in handle.maps.values()} == {1}
    finally:
        t2v.unet.set_attn_processor(AttnProcessor2_0())
    with broadway(t2v, BroadWayConfig(**CONFIG)):
        sdpa = run(t2v, guidance_scale=1.0)
    torch.testing.assert_close(explicit, sdpa, atol=1e-5, rtol=0)


def test_step_window_restarts_with_free_init(animatediff):
    animatediff.enable_free_init(num_iters=2, use_fast_sampling=True)
    try:
        with broadway(animatediff, BroadWayConfig(**CONFIG)) as handle:
            handle.record_maps = True
            run(animatediff, num_inference_steps=5, output_type="latent")
    finally:
        animatediff.disable_free_init()
    # Fast sampling runs 2 then 5 steps; the window is the first int(0.5 N) steps of each run: 1, then 2.
    assert (handle.state.calls, handle.state.active_calls) == (7, 3)
    assert sorted({(call, rec["step"]) for (call, _), rec in handle.maps.items()}) == [(1, 0), (3, 0), (4, 1)]


def test_refuses_what_it_cannot_compose_with(animatediff):
    from diffusers import AnimateDiffPAGPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

    pag = AnimateDiffPAGPipeline(**{k: v for k, v in animatediff.components.items()
                                    if k in ("vae", "text_encoder", "tokenizer", "unet", "motion_adapter",
                                             "scheduler")})
    with pytest.raises(ValueError, match="PAG"):
        apply_broadway(pag)
    animatediff.enable_free_noise(context_length=FRAMES, context_stride=2)
    try:
        with pytest.raises(ValueError, match="FreeNoise"):
            apply_broadway(animatediff)
    finally:
        animatediff.disable_free_noise()
    # FreeNoise enabled after BroadWay rebuilds the blocks: the next call raises instead of running vanilla.
    handle = enable_broadway(animatediff, tau=3, stop=0.5)
    animatediff.enable_free_noise(context_length=FRAMES, context_stride=2)
    try:
        with pytest.raises(RuntimeError, match="replaced"):
            run(animatediff, num_inference_steps=1)
    finally:
        animatediff.disable_free_noise()
        disable_broadway(animatediff)
    assert not broadway_enabled(animatediff)
    with pytest.raises(ValueError, match="already applied"):
        with broadway(animatediff, BroadWayConfig(**CONFIG)):
            apply_broadway(animatediff, BroadWayConfig(**CONFIG))
    animatediff.unet.set_attn_processor(SlicedAttnProcessor(2))
    try:
        with pytest.raises(ValueError, match="cannot wrap"):
            apply_broadway(animatediff)
    finally:
        animatediff.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="no temporal attention"):
        apply_broadway(animatediff, BroadWayConfig(target_blocks=("up_blocks.9",), **CONFIG))
    with pytest.raises(ValueError, match="scheduler="):
        apply_broadway(animatediff.unet)
    remove_broadway(animatediff)  # not applied: a no-op
    del handle


def test_bare_unet_with_three_chunks(t2v):
    """A PAG-style [uncond, cond, perturbed] batch given explicitly: beta* comes from chunk 1."""
    config = BroadWayConfig(cfg_layout=3, collect_stats=True, **CONFIG)
    with broadway(t2v.unet, config, scheduler=t2v.scheduler) as handle:
        handle.record_maps = True
        unet_call(t2v, batch=3)
    for stat in handle.stats:
        rec = next(r for (c, n), r in handle.maps.items() if n == stat["module"])
        cond = rec["vanilla"][1].double()
        assert rec["chunks"] == 3
        assert stat["E1"] == pytest.approx(float(cond.square().sum(-1).mean()), rel=1e-5)
