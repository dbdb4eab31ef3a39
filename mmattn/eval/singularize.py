"""Rule-based English singularisation, as in ``pattern.en.singularize`` (pattern 3.6).

The original CHAIR (Rohrbach et al., 2018) normalises every caption token with ``pattern.en.singularize``.
``pattern`` itself is not reliably installable any more, and CHAIR's numbers depend on its exact (and often
odd) outputs, e.g. ``bus -> bu``, ``glass -> glas``, ``tennis -> tenni``, ``people -> person``. This module
re-implements exactly the SINGULARIZE section of ``pattern/text/en/inflect.py``: the same word lists, the same
regular expressions in the same order, and the same order of checks, including behaviours that look like
bugs (``'^pie'`` / ``'^tie'`` entries that can never match, an uninflected check that tests whether a listed
word *ends with* the input). Do not "fix" anything here: parity with the published CHAIR tables is the point.

Licences of the rules reproduced here:

pattern: Copyright (c) 2011-2013 University of Antwerp, Belgium. All rights reserved.
Redistribution and use in source and binary forms, with or without modification, are permitted provided that
the following conditions are met: (1) Redistributions of source code must retain the above copyright notice,
this list of conditions and the following disclaimer. (2) Redistributions in binary form must reproduce the
above copyright notice, this list of conditions and the following disclaimer in the documentation and/or other
materials provided with the distribution. (3) Neither the name of Pattern nor the names of its contributors may
be used to endorse or promote products derived from this software without specific prior written permission.
THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED
WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A
PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT OWNER OR CONTRIBUTORS BE LIABLE FOR ANY
DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR
OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH
DAMAGE.

pattern adapted these rules from Bermi Ferrer's Inflector for Python, Copyright (c) 2006 Bermi Ferrer
Martinez, distributed with permission to deal in the software without restriction, subject to the condition:
THIS SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED
TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL
THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THIS SOFTWARE OR THE USE OR OTHER
DEALINGS IN THIS SOFTWARE.
"""

from __future__ import annotations

import re

__all__ = ["singularize"]

# Compound words whose second part is one of these are singularised on the first part
# ("mothers-in-law" -> "mother-in-law").
_PLURAL_PREPOSITIONS = frozenset(
    "about before during of till above behind except off to across below for on under after beneath from "
    "onto until among beside in out unto around besides into over upon at between near since with athwart "
    "betwixt beyond but by".split()
)

# Regular expression -> replacement; the first rule whose pattern matches decides. Order matters.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"(?i)(.)ae$", r"\1a"),
        (r"(?i)(.)itis$", r"\1itis"),
        (r"(?i)(.)eaux$", r"\1eau"),
        (r"(?i)(quiz)zes$", r"\1"),
        (r"(?i)(matr)ices$", r"\1ix"),
        (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
        (r"(?i)^(ox)en", r"\1"),
        (r"(?i)(alias|status)es$", r"\1"),
        (r"(?i)([octop|vir])i$", r"\1us"),
        (r"(?i)(cris|ax|test)es$", r"\1is"),
        (r"(?i)(shoe)s$", r"\1"),
        (r"(?i)(o)es$", r"\1"),
        (r"(?i)(bus)es$", r"\1"),
        (r"(?i)([m|l])ice$", r"\1ouse"),
        (r"(?i)(x|ch|ss|sh)es$", r"\1"),
        (r"(?i)(m)ovies$", r"\1ovie"),
        (r"(?i)(.)ombies$", r"\1ombie"),
        (r"(?i)(s)eries$", r"\1eries"),
        (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
        # -f / -fe nouns that take -ves in the plural (lives, wolves); these few rules are case-sensitive.
        (r"([aeo]l)ves$", r"\1f"),
        (r"([^d]ea)ves$", r"\1f"),
        (r"arves$", r"arf"),
        (r"erves$", r"erve"),
        (r"([nlw]i)ves$", r"\1fe"),
        (r"(?i)([lr])ves$", r"\1f"),
        (r"([aeo])ves$", r"\1ve"),
        (r"(?i)(sive)s$", r"\1"),
        (r"(?i)(tive)s$", r"\1"),
        (r"(?i)(hive)s$", r"\1"),
        (r"(?i)([^f])ves$", r"\1fe"),
        # -ses
        (r"(?i)(^analy)ses$", r"\1sis"),
        (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
        (r"(?i)(.)opses$", r"\1opsis"),
        (r"(?i)(.)yses$", r"\1ysis"),
        (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
        (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
        (r"(?i)(.)oses$", r"\1osis"),
        # -a
        (r"(?i)([ti])a$", r"\1um"),
        (r"(?i)(n)ews$", r"\1ews"),
        (r"(?i)s$", ""),
    )
)

_UNINFLECTED = (
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn high-jinks "
    "proceedings whiting britches eland homework rabies wildebeest carp elk innings salmon chassis flounder "
    "jackanapes scissors christmas gallows mackerel series clippers georgia measles shears cod graffiti mews "
    "species contretemps mumps swine corps news swiss"
).split()

_UNCOUNTABLE = (
    "advice equipment happiness luggage news software bread fruit information mathematics progress "
    "understanding butter furniture ketchup mayonnaise research water cheese garbage knowledge meat rice "
    "electricity gravel love mustard sand"
).split()

# "-ie" nouns whose plural only adds "s". The "^pie" / "^tie" entries are literal strings (pattern meant
# anchors), so they never match; kept as they are.
_IE_WORDS = (
    "alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie eyrie indie "
    "oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie goonie laddie pixie techie bombie "
    "groupie laramie quickie ^tie collie hankie lingerie reverie toughie cookie hippie meanie rookie valkyrie"
).split()

# Checked in this order; the first plural that ends the word wins ("women" -> "woman" through "men").
_IRREGULAR: dict[str, str] = {
    "atlantes": "atlas",
    "atlases": "atlas",
    "axes": "axe",
    "beeves": "beef",
    "brethren": "brother",
    "children": "child",
    "corpora": "corpus",
    "corpuses": "corpus",
    "ephemerides": "ephemeris",
    "feet": "foot",
    "ganglia": "ganglion",
    "geese": "goose",
    "genera": "genus",
    "genii": "genie",
    "graffiti": "graffito",
    "helves": "helve",
    "kine": "cow",
    "leaves": "leaf",
    "loaves": "loaf",
    "men": "man",
    "mongooses": "mongoose",
    "monies": "money",
    "moves": "move",
    "mythoi": "mythos",
    "numena": "numen",
    "occipita": "occiput",
    "octopodes": "octopus",
    "opera": "opus",
    "opuses": "opus",
    "our": "my",
    "oxen": "ox",
    "penes": "penis",
    "penises": "penis",
    "people": "person",
    "sexes": "sex",
    "soliloquies": "soliloquy",
    "teeth": "tooth",
    "testes": "testis",
    "trilbys": "trilby",
    "turves": "turf",
    "zoa": "zoon",
}
_IRREGULAR_PATTERNS = tuple(
    (re.compile("(?i)" + plural + "$"), plural, singular) for plural, singular in _IRREGULAR.items()
)


def singularize(word: str) -> str:
    """The singular of ``word`` exactly as ``pattern.en.singularize(word)`` (noun, no custom table) returns it."""
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PLURAL_PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):  # dogs' -> dog's
        return singularize(word[:-1]) + "'s"
    lower = word.lower()
    # pattern tests whether a listed word ends with the input (not the reverse), so short inputs such as
    # "is" or "a" are returned unchanged because "chassis" / "tuna" end with them.
    if any(listed.endswith(lower) for listed in _UNINFLECTED):
        return word
    if any(listed.endswith(lower) for listed in _UNCOUNTABLE):
        return word
    if any(lower.endswith(listed + "s") for listed in _IE_WORDS):
        return lower
    for pattern, plural, _singular in _IRREGULAR_PATTERNS:
        if lower.endswith(plural):
            return pattern.sub(_IRREGULAR[plural], word)
    for pattern, replacement in _RULES:
        if pattern.search(word):
            # Groups that did not take part in the match become empty strings (re.sub does so since 3.5).
            return pattern.sub(replacement, word)
    return word
