"""run_bt_rm.sh's environment knobs: what each accepts, checked before anything else runs.

    python -m btrm.knobs --check NAME=VALUE... -- [Hydra overrides...]   # run_bt_rm.sh, before torchrun
    python -m btrm.knobs --table                                         # run_bt_rm.sh --help's knob table

run_bt_rm.sh declares the knobs (`NAME=${NAME:-default}  # meaning`) and which Hydra key each
config knob sets (KNOB_OVERRIDES); this module reads both from the script, so names and defaults
stay declared there once. A knob that sets a trainer.yaml key accepts what that key's rule
(btrm.schema.KNOB_RULES) accepts, and is checked there with the composed config. The others go to
torchrun or the shell itself (LAUNCH_RULES): a value torchrun or bash arithmetic would reject, or
misread (`MAX_RESTARTS=abc` is a variable name to bash), is refused here in one line,
`error: NAME=value: expected ...; set NAME to ...`, exit status 2, appended to errors.log like the
launcher's other errors. Only the standard library is imported on the way to a verdict (~0.05 s).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "run_bt_rm.sh"
EXIT_REPORTED = 2  # btrm.launcher.EXIT_REPORTED (not imported: it pulls in more than this check needs)
# The knob lines of run_bt_rm.sh, as its --help has always read them: NAME=${NAME:-default}  # meaning
KNOB_LINE = re.compile(r"^([A-Z_]+)=\$\{[A-Z_]+:-(.*)\}[ \t]+# (.*)$", re.M)
# KNOB_OVERRIDES entries: key="$NAME", or ${NAME:+key="$NAME"} for a knob that may be unset
OVERRIDE_ENTRY = re.compile(r'([a-z_][a-z0-9_.]*)="\$([A-Z_]+)"')
MAX_INT = 2**31 - 1  # torchrun's integer options are C ints; bash arithmetic wraps silently beyond 2**63


@dataclass(frozen=True)
class Knob:
    name: str
    default: str  # as written in the script (may name another variable: ${WORLD_SIZE:-1})
    meaning: str


@dataclass(frozen=True)
class LaunchRule:
    expected: str  # said to the user, in the error and in --help
    accepts: Callable[[str, Mapping[str, str]], bool]  # (value, all knob values)


def decimal(value: str) -> int | None:
    """A plain decimal integer as bash and torchrun both read it (no sign, no leading zero: bash reads 08 as octal)."""
    return int(value) if re.fullmatch(r"0|[1-9][0-9]{0,9}", value) and int(value) <= MAX_INT else None


def integer(low: int, high: int = MAX_INT, *, also: tuple[str, ...] = ()) -> LaunchRule:
    words = " or ".join(also)
    span = f"an integer >= {low}" if high == MAX_INT else f"an integer from {low} to {high}"
    return LaunchRule(
        f"{words + ', or ' if words else ''}{span}",
        lambda v, _: v in also or (decimal(v) is not None and low <= decimal(v) <= high),
    )


def node_rank(value: str, values: Mapping[str, str]) -> bool:
    rank, nodes = decimal(value), decimal(values.get("NNODES", "1"))
    return rank is not None and rank < (nodes if nodes else MAX_INT)


def host(value: str, _) -> bool:
    return bool(value) and not re.search(r"\s", value)


# The knobs that do not set a trainer.yaml key: torchrun's options and the shell's own.
LAUNCH_RULES: dict[str, LaunchRule] = {
    "N_GPUS_PER_NODE": integer(1, also=("auto",)),
    "NNODES": integer(1),
    "NODE_RANK": LaunchRule("an integer from 0 to NNODES - 1", node_rank),
    "MASTER_ADDR": LaunchRule("a host name or IP address (no spaces)", host),
    "MASTER_PORT": integer(1, 65535),
    "PYTHON": LaunchRule("auto, or a Python interpreter (checked by run_bt_rm.sh)", lambda v, _: bool(v)),
    "OMP_NUM_THREADS": integer(1),
    "MAX_RESTARTS": integer(0),
    "SHUTDOWN_TIMEOUT": LaunchRule("an integer >= 0 (seconds)", lambda v, _: decimal(v) is not None),
}


def declared_knobs(script: Path = SCRIPT) -> list[Knob]:
    return [Knob(*match) for match in KNOB_LINE.findall(script.read_text(encoding="utf-8"))]


def config_keys(script: Path = SCRIPT) -> dict[str, str]:
    """{knob: the trainer.yaml key it sets}, from the script's KNOB_OVERRIDES array."""
    text = script.read_text(encoding="utf-8")
    block = re.search(r"^KNOB_OVERRIDES=\((.*?)^\)", text, re.M | re.S)
    return {name: key for key, name in OVERRIDE_ENTRY.findall(block.group(1))} if block else {}


def check_values(values: Mapping[str, str], script: Path = SCRIPT) -> str | None:
    """The first launch knob whose value its rule refuses, as the error line's message; None if all pass.
    A knob the script declares with no rule here and no trainer.yaml key is a bug, said as such."""
    keys = config_keys(script)
    for knob in declared_knobs(script):
        if knob.name in keys:
            # a trainer.yaml key: btrm.schema checks its value in the composed config, naming the key;
            # here only that Hydra reads it as one value, as the user meant
            problem = hydra_reading(keys[knob.name], values.get(knob.name, ""))
            if problem:
                return f"{knob.name}={values[knob.name]}: {problem}"
            continue
        rule = LAUNCH_RULES.get(knob.name)
        if rule is None:
            return f"{knob.name}: run_bt_rm.sh declares this knob but btrm.knobs has no rule for it; add one"
        value = values.get(knob.name, "")
        if not rule.accepts(value, values):
            return f"{knob.name}={value}: expected {rule.expected}; set {knob.name} to such a value (bash run_bt_rm.sh --help lists each knob's range)"
    return None


HYDRA_SPECIAL = re.compile(r"[=,\[\]{}()'\"\\]")  # characters Hydra's override grammar gives a meaning


def hydra_reading(key: str, value: str) -> str | None:
    """Why Hydra would not read `key=value` as the one value the knob holds (a parse error, or a sweep), or None.
    Hydra is imported only for values with its special characters."""
    if not HYDRA_SPECIAL.search(value):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    quoted = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    remedy = f'quote the value for Hydra, e.g. "{quoted}"'
    try:
        override = OverridesParser.create().parse_overrides([f"{key}={value}"])[0]
    except HydraException as error:
        reason = str(error).strip().splitlines()[0]
        return f"Hydra cannot read {key}={value} ({reason}); {remedy}"
    if override.is_sweep_override():
        return f"Hydra reads {key}={value} as a sweep over several values; {remedy} (a list is written [a,b])"
    return None


def allowed(knob: Knob, keys: Mapping[str, str]) -> str:
    """What a knob accepts, for --help: its launch rule, or its trainer.yaml key's rule."""
    if knob.name in keys:
        from btrm.schema import KNOB_RULES

        return f"{KNOB_RULES[keys[knob.name]].expected} (as {keys[knob.name]})"
    return LAUNCH_RULES[knob.name].expected


def help_table(script: Path = SCRIPT) -> str:
    """One block per knob: name, default, what it accepts, what it sets."""
    keys, lines = config_keys(script), []
    for knob in declared_knobs(script):
        default = re.sub(r"\$\{([A-Z_]+):-([^}]*)\}", r"$\1, else \2", knob.default) or "(unset)"
        lines.append(f"  {knob.name:<17} {default:<31} {knob.meaning}")
        lines.append(f"  {'':<17} {'':<31} allowed: {allowed(knob, keys)}")
    return "\n".join(lines)


def report(message: str, overrides: Sequence[str]) -> int:
    """The error line on stderr and in <trainer.default_local_dir>/errors.log (from the Hydra overrides)."""
    line = f"error: {message}"
    print(line, file=sys.stderr, flush=True)
    try:
        from btrm import launcher

        launcher.append_error_log(launcher.log_dir_for([o for o in overrides if not o.startswith("-")]), line)
    except Exception:  # the log is a copy of the line just printed: never a reason to fail differently
        pass
    return EXIT_REPORTED


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--table"]:
        print(help_table())
        return 0
    if argv[:1] != ["--check"]:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return EXIT_REPORTED
    split = argv.index("--") if "--" in argv else len(argv)
    values = dict(item.split("=", 1) for item in argv[1:split] if "=" in item)
    message = check_values(values)
    return 0 if message is None else report(message, argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
