"""Choosing the form of each fused op for a run, out loud.

``--fused`` is ``auto`` (a fused form only where it is faster here than PyTorch's),
``none``, ``all`` (every op fused, or an error saying which cannot be), or a list of ops to
fuse, ``OP`` or ``OP=FORM`` (``rmsnorm,rope=triton``); the ops not listed keep PyTorch's form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sftplug.deprecated import renamed_attribute
from sftplug.dtypes import dtype_name
from sftplug.errors import SftplugError
from sftplug.fused.op import OPS, FusedOp, FusedOpsRequest, OpSet
from sftplug.offers import Offer, checked, priority_of

PYTORCH = "pytorch"  # the name of every op's PyTorch form


@dataclass
class FusedChoice:
    ops: OpSet
    forms: dict[str, str]  # op -> the chosen form's name
    why_chosen: dict[str, str] = field(default_factory=dict)  # op -> why its form, in a few words
    rejected: dict[str, dict[str, str]] = field(default_factory=dict)  # op -> {form: why it is unavailable}

    reasons = renamed_attribute("reasons", "why_chosen")

    def describe(self) -> str:
        """'rmsnorm, glu: triton (requested); rope, cross_entropy: pytorch (not requested)' for the run header."""
        groups: dict[tuple[str, str], list[str]] = {}
        for op in OPS:
            groups.setdefault((self.forms[op], self.why_chosen[op]), []).append(op)
        return "; ".join(f"{', '.join(ops)}: {form} ({why})" for (form, why), ops in groups.items())

    @property
    def fused(self) -> list[str]:
        return [op for op in OPS if self.forms[op] != PYTORCH]


def parse_fused(value: str) -> dict[str, str | None] | str:
    """``--fused``: "auto", "none" or "all" as given, else {op: form name or None (the best)}."""
    value = (value or "").strip()
    if value in ("auto", "none", "all"):
        return value
    wanted: dict[str, str | None] = {}
    for item in (p.strip() for p in value.split(",")):
        op, _, form = item.partition("=")
        op, form = op.strip(), form.strip() or None
        if op not in OPS:
            raise SftplugError(f"--fused {value}: unknown op {op!r}; give auto, none, all, or ops among "
                               f"{', '.join(OPS)} (OP=FORM picks a form, e.g. rmsnorm=triton)")
        if op in wanted:
            raise SftplugError(f"--fused {value}: {op} is given twice")
        wanted[op] = form
    return wanted


def survey(hook, request: FusedOpsRequest) -> dict[str, list[Offer]]:
    """Every fused form the plugins offer for ``request``, by op, fastest first."""
    offers: dict[str, list[Offer]] = {op: [] for op in OPS}
    for forms in hook.select_fused_ops(request=request):
        for form in forms or ():
            if form.op in offers:
                offers[form.op].append(_ask(form, request))
    return {op: sorted(found, key=lambda o: (-o.priority, o.name)) for op, found in offers.items()}


def _ask(form: FusedOp, request: FusedOpsRequest) -> Offer:
    """Can this form compute the request, and is it faster than PyTorch's there? Only a form
    that can is asked the second (its priority may be a measurement)."""
    why_unavailable = checked(form, request)
    if why_unavailable is not None:
        return Offer(form, 0, "", why_unavailable)
    try:
        return Offer(form, *priority_of(form, request))
    except Exception as exc:  # a third-party priority_for must not break the choice either
        return Offer(form, 0, "", f"its priority_for raised {type(exc).__name__}: {exc}")


def choose_fused_ops(hook, request: FusedOpsRequest, fused: str, compiled: bool = False,
                     skipped: dict[str, str] | None = None) -> FusedChoice:
    """The form of every op for ``--fused`` (see the module docstring), or one line saying why not.

    ``compiled``: blocks run under torch.compile, which fuses these ops itself; ``skipped``:
    plugins that offer fused ops but did not register, name -> why unavailable.
    """
    wanted = parse_fused(fused)
    if compiled and wanted not in ("auto", "none"):
        raise SftplugError(f"--fused {fused} with --compile: torch.compile fuses these ops itself and does not "
                           "trace the fused kernels; use one or the other")
    if wanted == "none" or compiled:
        why_chosen = "--compile fuses it" if compiled else "--fused none"
        return FusedChoice(OpSet(), {op: PYTORCH for op in OPS}, {op: why_chosen for op in OPS})
    offers = survey(hook, request)
    forms, why_chosen, rejected, chosen = {}, {}, {}, {}
    for op in OPS:
        if not request.uses(op):  # grouped_linear of a dense model: whatever --fused says
            forms[op], why_chosen[op] = PYTORCH, "not used"
            continue
        working = [o for o in offers[op] if o.why_unavailable is None]
        rejected[op] = {o.name: o.why_unavailable for o in offers[op] if o.why_unavailable is not None}
        if wanted == "auto":
            best = next((o for o in working if o.priority > 0), None)
            if best is None:
                forms[op], why_chosen[op] = PYTORCH, _auto_pytorch(working, rejected[op], request)
                continue
            forms[op], chosen[op] = best.name, best.backend
            why_chosen[op] = f"auto: {best.why_chosen}" if best.why_chosen else "auto"
        elif wanted == "all" or op in wanted:
            name = None if wanted == "all" else wanted[op]
            offer = _required(op, name, offers[op], working, rejected[op], request, skipped or {}, fused)
            forms[op], why_chosen[op], chosen[op] = offer.name, "requested", offer.backend
        else:
            forms[op], why_chosen[op] = PYTORCH, "not requested"
    return FusedChoice(OpSet(**chosen), forms, why_chosen, rejected)


def _auto_pytorch(working: list[Offer], rejected: dict[str, str], request: FusedOpsRequest) -> str:
    if working:
        slower = "; ".join(f"{o.name}: {o.why_chosen}" if o.why_chosen else o.name for o in working)
        return f"auto: no fused form is faster here ({slower})"
    if rejected:
        return "auto: " + "; ".join(f"{name}: {why}" for name, why in rejected.items())
    return f"auto: no fused form offered for {request.device.type}"


def _required(op, name, offers, working, rejected, request, skipped, fused) -> Offer:
    """The form asked for (by name, or the best that works), or an error naming what would."""
    what = f"{dtype_name(request.dtype)} on {request.device.type}"
    usable = ", ".join(o.name for o in working) or "none"
    if name is None:
        if working:
            return working[0]
        listed = "; ".join(f"{n}: {why}" for n, why in {**rejected, **skipped}.items()) or "no plugin offers one"
        raise SftplugError(f"--fused {fused}: no fused {op} runs {what}: {listed}; use --fused auto or none")
    offer = next((o for o in offers if o.name == name), None)
    if offer is None:
        known = ", ".join(sorted({o.name for o in offers})) or "none"
        unavailable = "".join(f"; plugin {n} is unavailable: {why}" for n, why in skipped.items())
        raise SftplugError(f"--fused {fused}: no fused form {name!r} of {op} is offered (offered: {known}"
                           f"{unavailable})")
    if offer.why_unavailable is not None:
        raise SftplugError(f"--fused {fused}: {name} cannot compute {op} for {what}: {offer.why_unavailable}; "
                           f"usable here: {usable}")
    return offer


def fused_skipped(registry) -> dict[str, str]:
    """Skipped plugins that offer fused ops: name -> why unavailable."""
    return {p.name: p.why_unavailable for p in registry.skipped() if "select_fused_ops" in p.hooks}


def attach_fused(model, registry, request: FusedOpsRequest, fused: str, compiled: bool = False) -> FusedChoice:
    """Choose the forms for ``--fused`` and set them on ``model``; the loss takes ``choice.ops.cross_entropy``."""
    choice = choose_fused_ops(registry.hook, request, fused, compiled, fused_skipped(registry))
    model.set_fused_ops(choice.ops)
    return choice
