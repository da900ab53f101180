"""What a request may change about the loaded deltas: the operator's policy, one entry per delta.

An *enforced* delta (an unlearning filter) always runs: a request may raise its alpha but cannot
switch it off, lower it below the operator's floor, or flip its sign (:class:`PolicyError`, HTTP
403). An *optional* delta (a format or style delta) may be set per request to any alpha, 0
switching it off, except that while an enforced delta is loaded it cannot be inverted (given the
opposite sign of the operator's alpha): an inverted delta pushes against the filter, and the same
bundle loaded twice, once enforced and once optional at -alpha, would cancel it exactly. Bundles
trained with an ``unlearn-*`` objective are enforced unless the operator says otherwise; everything
else is optional.

>>> p = DeltaPolicy("filter", alpha=1.0, mode="enforced")
>>> p.check(2.0)
2.0
>>> p.check(0.0)
Traceback (most recent call last):
...
cmc_edge.errors.PolicyError: delta 'filter' is enforced by the server's operator: alpha 0 would switch it off (allowed: 1 or more). Fix: leave the alpha of 'filter' out of the request
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from cmc_edge.errors import InputError, PolicyError

Mode = Literal["enforced", "optional"]
MAX_ABS_ALPHA = 16.0      # past this a shift only wrecks the text; a request cannot ask for more


@dataclass(frozen=True)
class DeltaPolicy:
    """One delta's rule. ``alpha``: what runs when a request says nothing; ``min_alpha`` (enforced
    only): the smallest magnitude a request may ask for, same sign as ``alpha`` (default ``|alpha|``)."""

    name: str
    alpha: float
    mode: Mode = "optional"
    min_alpha: float | None = None

    def __post_init__(self):
        if self.mode not in ("enforced", "optional"):
            raise InputError(f"delta policy must be 'enforced' or 'optional', got {self.mode!r}",
                             fix="use --enforce NAME or --optional NAME")
        if self.mode == "enforced":
            if self.alpha == 0.0:
                raise InputError(f"delta {self.name!r} is enforced but its alpha is 0 (switched off)",
                                 fix=f"give it a non-zero --alpha, or make it --optional {self.name}")
            floor = abs(self.alpha) if self.min_alpha is None else self.min_alpha
            if not (math.isfinite(floor) and 0 < floor <= abs(self.alpha)):
                raise InputError(f"the floor of enforced delta {self.name!r} must be in (0, {abs(self.alpha):g}] "
                                 f"(its alpha), got {floor!r}", fix=f"e.g. --enforce {self.name}={abs(self.alpha):g}")
            object.__setattr__(self, "min_alpha", floor)
        elif self.min_alpha is not None:
            raise InputError(f"delta {self.name!r} is optional, so it has no alpha floor",
                             fix=f"use --enforce {self.name}={self.min_alpha:g}")

    def check(self, alpha: float, *, enforced: Sequence[str] = ()) -> float:
        """``alpha`` if a request may run this delta at it; else :class:`PolicyError` / :class:`InputError`.
        ``enforced``: the names of the enforced deltas loaded beside this one."""
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)) or abs(alpha) > MAX_ABS_ALPHA:
            raise InputError(f"alpha for delta {self.name!r} must be a finite number in "
                             f"[-{MAX_ABS_ALPHA:g}, {MAX_ABS_ALPHA:g}], got {alpha!r}", fix="e.g. 1.0")
        alpha = float(alpha)
        if self.mode == "enforced":
            sign = math.copysign(1.0, self.alpha)
            allowed = f"{sign * self.min_alpha:g} or {'more' if sign > 0 else 'less'}"
            if alpha == 0.0:
                why = "would switch it off"
            elif math.copysign(1.0, alpha) != sign:
                why = "would invert it"
            elif abs(alpha) < self.min_alpha:
                why = "is below the operator's floor"
            else:
                return alpha
            raise PolicyError(f"delta {self.name!r} is enforced by the server's operator: alpha {alpha:g} {why} "
                              f"(allowed: {allowed})", fix=f"leave the alpha of {self.name!r} out of the request")
        if enforced and alpha != 0.0 and math.copysign(1.0, alpha) != math.copysign(1.0, self.alpha or 1.0):
            raise PolicyError(f"delta {self.name!r} cannot be inverted (alpha {alpha:g}) while the server enforces "
                              f"{enforced[0]!r}: an inverted delta pushes against the filter, and could cancel it",
                              fix=f"give {self.name!r} an alpha of the operator's sign, or 0 to switch it off")
        return alpha

    def describe(self) -> dict:
        """What ``GET /v1/models`` shows (no file paths)."""
        d = {"name": self.name, "alpha": self.alpha, "policy": self.mode}
        if self.mode == "enforced":
            d["min_alpha"] = self.min_alpha
        return d


def default_mode(objective: str | None) -> Mode:
    """Unlearning filters are enforced; other deltas (formats, styles) are optional."""
    return "enforced" if isinstance(objective, str) and objective.startswith("unlearn") else "optional"


def parse_enforce(spec: str) -> tuple[str, float | None]:
    """``"NAME"`` or ``"NAME=MIN_ALPHA"`` (from ``--enforce``).

    >>> parse_enforce("filter"), parse_enforce("filter=0.5")
    (('filter', None), ('filter', 0.5))
    """
    name, sep, floor = spec.partition("=")
    if not sep:
        return name, None
    try:
        return name, float(floor)
    except ValueError:
        raise InputError(f"--enforce {spec}: {floor!r} is not a number", fix="use --enforce NAME or NAME=MIN_ALPHA") from None


def build_policies(deltas, *, enforce: Sequence[str] = (), optional: Sequence[str] = ()) -> tuple[DeltaPolicy, ...]:
    """One policy per delta (objects with ``name``, ``alpha`` and ``objective``): the bundle's default
    (:func:`default_mode`) unless named in ``enforce`` (``NAME`` or ``NAME=MIN_ALPHA``) or ``optional``."""
    names = [d.name for d in deltas]
    forced = dict(parse_enforce(s) for s in enforce)
    for name in [*forced, *optional]:
        if name not in names:
            raise InputError(f"no loaded delta is named {name!r} (loaded: {', '.join(names) or 'none'})",
                             fix="name a delta as it is loaded (its directory name, or --delta NAME=DIR)")
    both = sorted(set(forced) & set(optional))
    if both:
        raise InputError(f"delta {both[0]!r} is both --enforce'd and --optional", fix="pick one")
    out = []
    for d in deltas:
        if d.name in forced:
            out.append(DeltaPolicy(d.name, d.alpha, "enforced", forced[d.name]))
        elif d.name in optional:
            out.append(DeltaPolicy(d.name, d.alpha, "optional"))
        else:
            out.append(DeltaPolicy(d.name, d.alpha, default_mode(getattr(d, "objective", None))))
    return tuple(out)


def resolve_alphas(policies: Sequence[DeltaPolicy], *, alpha: float | None = None,
                   alphas: Sequence[float] | None = None, by_name: Mapping[str, float] | None = None) -> list[float]:
    """The alpha each delta runs at for a request that gives one of: ``alpha`` (every delta),
    ``alphas`` (one per delta, in load order) or ``by_name`` (some deltas, by name; the rest keep the
    operator's alpha). Every requested value passes its delta's policy."""
    given = [k for k, v in (("alpha", alpha), ("alphas", alphas), ("deltas", by_name)) if v is not None]
    if len(given) > 1:
        raise InputError(f'"cmc" gives both {given[0]!r} and {given[1]!r}', fix='use one of them (prefer "deltas")')
    wanted = [p.alpha for p in policies]
    explicit = [False] * len(policies)
    if alpha is not None:
        wanted, explicit = [alpha] * len(policies), [True] * len(policies)
    elif alphas is not None:
        if len(alphas) != len(policies):
            raise InputError(f'"cmc.alphas" needs {len(policies)} numbers (one per loaded delta), got {len(alphas)}',
                             fix='see GET /v1/models for the loaded deltas, or use "cmc": {"deltas": {NAME: alpha}}')
        wanted, explicit = list(alphas), [True] * len(policies)
    elif by_name is not None:
        index = {p.name: i for i, p in enumerate(policies)}
        for name, a in by_name.items():
            if name not in index:
                raise InputError(f"no delta named {name[:60]!r} is loaded (loaded: {', '.join(index) or 'none'})",
                                 fix="see GET /v1/models for the loaded deltas")
            wanted[index[name]], explicit[index[name]] = a, True
    enforced = [p.name for p in policies if p.mode == "enforced"]
    return [p.check(a, enforced=enforced) if e else p.alpha for p, a, e in zip(policies, wanted, explicit)]
