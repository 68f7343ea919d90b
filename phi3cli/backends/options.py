"""Options a backend declares in its spec (like llm's Model.Options): what `--option KEY=VALUE` may set.

A backend lists its BackendOptions in `BackendSpec.options`; `phi3 chat`, `phi3 serve` and `phi3 bench` take
`--option KEY=VALUE` and the core checks each against the spec of the backend routed to (check_options), so a wrong
key or value is a one-line error naming what the backend takes, before anything loads. The backend reads the checked,
typed values from LoadRequest.options.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phi3cli.errors import Phi3Error

if TYPE_CHECKING:
    from phi3cli.backends import BackendSpec

_TYPE_WORDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class BackendOption:
    """One setting a backend takes: its name, type, allowed values, default (in words) and what it does."""

    name: str
    help: str
    type: type = str  # int, float, str or bool
    choices: tuple[str, ...] = ()  # the values allowed (lower case); empty: any value of the type
    minimum: float | None = None  # the least value a number may take
    default: Any = None  # the value that applies when it is not set; None: the runtime's own, or as help says
    devices: tuple[str, ...] = ()  # the devices where it applies; empty: every one

    @property
    def allowed(self) -> str:
        """The values it takes, in words: 'u8, u4 or f16', 'a whole number ≥ 0'."""
        if self.choices:
            return (
                ", ".join(self.choices[:-1]) + f" or {self.choices[-1]}" if len(self.choices) > 1 else self.choices[0]
            )
        least = f" ≥ {self.minimum:g}" if self.minimum is not None else ""
        return _TYPE_WORDS.get(self.type, self.type.__name__) + least

    def parse(self, value: Any, backend: str) -> Any:
        """The value as the backend reads it (choices lower case, numbers as numbers), or a one-line Phi3Error."""
        text = str(value).strip()
        wrong = Phi3Error(
            f"The {backend} option {self.name} takes {self.allowed}, not {text!r}.",
            hint=f"For example --option {self.name}={self.choices[0] if self.choices else self.default or 1}",
        )
        if self.type is bool:
            if isinstance(value, bool) or text.lower() in (*_TRUE, *_FALSE):
                return value if isinstance(value, bool) else text.lower() in _TRUE
            raise wrong
        if self.type in (int, float):
            try:
                number = self.type(text)
            except ValueError:
                raise wrong from None
            if self.minimum is not None and number < self.minimum:
                raise wrong
            return number
        if self.choices and text.lower() not in self.choices:
            raise wrong
        return text.lower() if self.choices else text


def parse_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """`--option KEY=VALUE` values as a dict (keys with - or _ alike); a pair without '=' is a one-line error."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or not key:
            raise Phi3Error(
                f"--option takes KEY=VALUE, not {pair!r}.", hint="For example --option kv_cache_precision=f16"
            )
        options[key] = value
    return options


def check_options(spec: BackendSpec, options: Mapping[str, Any], *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The options checked against what the backend declares and typed; keys in skip (phi3's own) pass as they are."""
    declared = {o.name: o for o in spec.options}
    skipped = set(skip)
    unknown = [k for k in options if k not in declared and k not in skipped]
    if unknown:
        raise Phi3Error(_unknown_message(spec, unknown), hint=_unknown_hint(spec, unknown))
    return {k: v if k in skipped else declared[k].parse(v, spec.name) for k, v in options.items()}


def _unknown_message(spec: BackendSpec, unknown: list[str]) -> str:
    given = ", ".join(unknown)
    if not spec.options:
        return f"The {spec.name} backend takes no options (given: {given})."
    return f"The {spec.name} backend has no option {given}; it takes: {', '.join(o.name for o in spec.options)}."


def _unknown_hint(spec: BackendSpec, unknown: list[str]) -> str | None:
    from phi3cli.backends import registry

    owners = [s.name for s in registry().values() if s.name != spec.name and unknown[0] in {o.name for o in s.options}]
    if owners:
        return f"{unknown[0]} is an option of the {' and '.join(owners)} backend: add --backend {owners[0]}."
    return "`phi3 devices` lists every backend's options."


def options_for(spec: BackendSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options among these that this backend declares (bench sets each configuration's own)."""
    declared = {o.name for o in spec.options}
    return {k: v for k, v in options.items() if k in declared}


def check_declared(specs: Iterable[BackendSpec], options: Mapping[str, Any]) -> None:
    """Refuse an option none of these backends declares (bench: one the measured backends would all ignore)."""
    specs = list(specs)
    declared = {o.name for s in specs for o in s.options}
    unknown = [k for k in options if k not in declared]
    if unknown:
        takes = ", ".join(f"{s.name}: {', '.join(o.name for o in s.options)}" for s in specs if s.options)
        raise Phi3Error(
            f"No backend measured here has the option {', '.join(unknown)}"
            + (f" (they take {takes})." if takes else "; they take no options."),
            hint="`phi3 devices` lists every backend's options.",
        )
