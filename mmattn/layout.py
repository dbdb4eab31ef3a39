"""TokenLayout: where image, system, instruction and generated tokens sit in each sample of a batch.

Built once per request at prefill from ``input_ids`` / ``attention_mask`` (the image placeholder tokens are
still in ``input_ids`` then; during decode they are not), and extended implicitly during decode: every key
position at or past the prompt length is a generated token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Role", "TokenLayout", "NextImageGeometry", "llava_next_newline_offsets"]


class Role:
    """Integer role of a token; also usable directly as key groups."""

    PAD = 0
    SYSTEM = 1  # prompt text before the first image
    IMAGE = 2  # image patch features
    IMAGE_NEWLINE = 3  # LLaVA-NeXT's row-end newline embeddings inside the image span
    INSTRUCTION = 4  # prompt text after the first image (between and after images)
    GENERATED = 5
    COUNT = 6
    NAMES = ("pad", "system", "image", "image_newline", "instruction", "generated")


@dataclass
class TokenLayout:
    """Per-sample token roles of a prompt batch of shape [B, N] (padding left or right)."""

    roles: torch.Tensor  # long [B, N], values from Role
    image_index: torch.Tensor  # long [B, N]: index of the image within its sample, -1 elsewhere
    prompt_length: int

    @property
    def batch_size(self) -> int:
        return self.roles.shape[0]

    @property
    def valid(self) -> torch.Tensor:
        return self.roles != Role.PAD

    @property
    def image(self) -> torch.Tensor:
        """Image-feature positions, newline tokens included."""
        return (self.roles == Role.IMAGE) | (self.roles == Role.IMAGE_NEWLINE)

    @property
    def image_patch(self) -> torch.Tensor:
        return self.roles == Role.IMAGE

    @property
    def num_image_tokens(self) -> torch.Tensor:
        return self.image.sum(dim=1)

    @property
    def image_start(self) -> torch.Tensor:
        """First image position per sample ([B]; prompt_length where a sample has no image)."""
        return _first_true(self.image, self.prompt_length)

    @property
    def image_end(self) -> torch.Tensor:
        """One past the last image position per sample ([B]; prompt_length where a sample has no image)."""
        n = self.prompt_length
        reversed_first = _first_true(self.image.flip(1), n)
        return torch.where(reversed_first < n, n - reversed_first, torch.full_like(reversed_first, n))

    @property
    def last_prompt_position(self) -> torch.Tensor:
        """Position of the last real prompt token per sample ([B]); handles left and right padding."""
        n = self.prompt_length
        return n - 1 - _first_true(self.valid.flip(1), n)

    def roles_for(self, kv_len: int) -> torch.Tensor:
        """Roles of ``kv_len`` key positions: the prompt's, then GENERATED for everything after it.

        ``kv_len`` smaller than the prompt (a chunked prefill) returns the prompt's first positions.
        """
        if kv_len <= self.prompt_length:
            return self.roles[:, :kv_len]
        extra = torch.full(
            (self.batch_size, kv_len - self.prompt_length), Role.GENERATED, dtype=self.roles.dtype, device=self.roles.device
        )
        return torch.cat([self.roles, extra], dim=1)

    def select(self, index: torch.Tensor) -> "TokenLayout":
        """The layout of a compacted sequence: ``index`` [B, L'] holds prompt positions, -1 for padding."""
        index = index.to(self.roles.device)
        safe = index.clamp_min(0)
        roles = torch.where(index >= 0, torch.gather(self.roles, 1, safe), torch.full_like(safe, Role.PAD))
        image_index = torch.where(index >= 0, torch.gather(self.image_index, 1, safe), torch.full_like(safe, -1))
        return TokenLayout(roles=roles, image_index=image_index, prompt_length=index.shape[1])

    def to(self, device: torch.device | str) -> "TokenLayout":
        return TokenLayout(self.roles.to(device), self.image_index.to(device), self.prompt_length)

    @classmethod
    def from_input_ids(
        cls,
        input_ids: torch.Tensor,
        image_token_id: int,
        attention_mask: torch.Tensor | None = None,
        image_token_counts: list[list[int]] | None = None,
        newline_offsets: list[list[list[int]]] | None = None,
    ) -> "TokenLayout":
        """Build the layout of a prompt batch.

        Args:
            input_ids: [B, N] with every image expanded to its placeholder tokens (as LLaVA processors do).
            image_token_id: the placeholder id (``model.config.image_token_id``).
            attention_mask: [B, N], 0 on padding.
            image_token_counts: per sample, the number of placeholder tokens of each image, in order; needed to
                tell adjacent images apart (None: each maximal run of placeholders is one image).
            newline_offsets: per sample, per image, offsets of LLaVA-NeXT newline tokens within that image's run.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
        batch, length = input_ids.shape
        device = input_ids.device
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_image = (input_ids == image_token_id) & valid
        roles = torch.full((batch, length), Role.PAD, dtype=torch.long, device=device)
        image_index = torch.full((batch, length), -1, dtype=torch.long, device=device)
        positions = torch.arange(length, device=device)
        for b in range(batch):
            image_pos = positions[is_image[b]]
            if image_pos.numel() == 0:
                roles[b, valid[b]] = Role.SYSTEM
                continue
            first = int(image_pos[0])
            text = valid[b] & ~is_image[b]
            roles[b, text & (positions < first)] = Role.SYSTEM
            roles[b, text & (positions > first)] = Role.INSTRUCTION
            roles[b, is_image[b]] = Role.IMAGE
            counts = image_token_counts[b] if image_token_counts is not None else _run_lengths(image_pos)
            if sum(counts) != image_pos.numel():
                raise ValueError(
                    f"sample {b}: {image_pos.numel()} image placeholder tokens but the images account for "
                    f"{sum(counts)} ({counts}); the prompt and the images do not match"
                )
            offset = 0
            for image, count in enumerate(counts):
                span = image_pos[offset : offset + count]
                image_index[b, span] = image
                if newline_offsets is not None:
                    lines = torch.as_tensor(newline_offsets[b][image], dtype=torch.long, device=device)
                    if lines.numel():
                        roles[b, span[lines]] = Role.IMAGE_NEWLINE
                offset += count
        return cls(roles=roles, image_index=image_index, prompt_length=length)


def _first_true(mask: torch.Tensor, default: int) -> torch.Tensor:
    """Index of the first True per row of a [B, N] bool tensor, ``default`` where there is none."""
    n = mask.shape[1]
    idx = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.full_like(idx, n)).amin(dim=1).clamp_max(default) if n else torch.full(
        (mask.shape[0],), default, dtype=torch.long, device=mask.device
    )


def _run_lengths(sorted_positions: torch.Tensor) -> list[int]:
    breaks = (sorted_positions[1:] - sorted_positions[:-1] != 1).nonzero().flatten().tolist()
    bounds = [0] + [i + 1 for i in breaks] + [sorted_positions.numel()]
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


@dataclass(frozen=True)
class NextImageGeometry:
    """Where one LLaVA-NeXT image's features sit in its token run.

    The run is the base (low-resolution) crop's ``base`` features, then the anyres grid of ``grid_h x grid_w``
    tiles (``side x side`` patches each), unpadded to ``rows x cols`` patches and read row by row with one
    newline token after every row (``LlavaNextModel.pack_image_features``).
    """

    base: int
    side: int
    grid_h: int
    grid_w: int
    rows: int
    cols: int

    @property
    def num_tokens(self) -> int:
        return self.base + self.rows * (self.cols + 1)

    @property
    def num_crops(self) -> int:
        return 1 + self.grid_h * self.grid_w

    @property
    def newline_offsets(self) -> list[int]:
        return [self.base + r * (self.cols + 1) + self.cols for r in range(self.rows)]

    def crop_patch_offsets(self) -> list[torch.Tensor]:
        """Per crop (base first, then tiles row-major), each patch's offset in the run; -1 where unpadding cut it.

        Unpadding keeps the centred ``rows x cols`` window: it removes ``(grid - kept) // 2`` patches from each side
        (``unpad_image``)."""
        side = self.side
        crops = [torch.arange(self.base)]
        top = (self.grid_h * side - self.rows) // 2
        left = (self.grid_w * side - self.cols) // 2
        r = torch.arange(side)[:, None]
        c = torch.arange(side)[None, :]
        for tile in range(self.grid_h * self.grid_w):
            ti, tj = divmod(tile, self.grid_w)
            grid_r, grid_c = ti * side + r - top, tj * side + c - left
            inside = (grid_r >= 0) & (grid_r < self.rows) & (grid_c >= 0) & (grid_c < self.cols)
            offset = self.base + grid_r * (self.cols + 1) + grid_c
            crops.append(torch.where(inside, offset, torch.full_like(offset, -1)).flatten())
        return crops

    @classmethod
    def from_image_size(cls, config, image_size, vision_feature_select_strategy: str = "default") -> "NextImageGeometry":
        """From the image's (height, width), with transformers' own anyres helpers."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        base = side * side + (1 if vision_feature_select_strategy == "full" else 0)
        grid_h, grid_w = get_anyres_image_grid_shape(tuple(int(x) for x in image_size), config.image_grid_pinpoints, vision.image_size)
        dummy = torch.empty(1, int(grid_h) * side, int(grid_w) * side)
        rows, cols = unpad_image(dummy, torch.as_tensor(image_size)).shape[1:]
        return cls(base, side, int(grid_h), int(grid_w), int(rows), int(cols))

    @classmethod
    def from_packed_features(cls, config, num_tokens: int, newline_offsets: list[int],
                             vision_feature_select_strategy: str = "default") -> "NextImageGeometry":
        """From a packed feature run (when ``image_sizes`` is not at hand, e.g. features encoded by ``generate``).

        Unpadding trims one axis only and by less than a tile, so the untrimmed axis fixes its tile count and the
        other rounds up."""
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        base = side * side + (1 if vision_feature_select_strategy == "full" else 0)
        rows = len(newline_offsets)
        if rows == 0:
            return cls(base, side, 0, 0, 0, 0)
        cols = (num_tokens - base) // rows - 1
        geometry = cls(base, side, -(-rows // side), -(-cols // side), rows, cols)
        if geometry.num_tokens != num_tokens or geometry.newline_offsets != list(newline_offsets):
            raise ValueError("LLaVA-NeXT image features do not have the base + rows x (cols + newline) layout")
        return geometry


def llava_next_newline_offsets(config, image_size: tuple[int, int], vision_feature_select_strategy: str) -> tuple[int, list[int]]:
    """Token count and newline offsets of one LLaVA-NeXT image of the given (height, width)."""
    geometry = NextImageGeometry.from_image_size(config, image_size, vision_feature_select_strategy)
    return geometry.num_tokens, geometry.newline_offsets
