r"""The reproduction's vocabulary: protocols, variants and their names, summary constants."""

from dataclasses import asdict

from dhp_deploy.network import default_head_init
from dhp_deploy.config import TrainConfig
from dhp_deploy.regularizers import METHODS, REGISTRY

SUMMARY_KIND, SUMMARY_VERSION = "dhp-run-summary", 1
ADAPTATION_KIND = "dhp-adaptation"  # benchmarks/adaptation.py's records
SUMMARY_DIR_RUNS, SUMMARY_DIR_SEARCH, SUMMARY_DIR_TRACE = "runs", "search", "trace"
DIVERGED_NAME = "diverged.json"  # beside a run that stopped on a non-finite loss (reproduce.py)
# The paper's protocol (docs/DESIGN.md §1) is TrainConfig's defaults; permuted-MNIST epochs are
# not stated: 10, as for split.
PAPER_PROTOCOL = {name: getattr(TrainConfig(), name)
                  for name in ("epochs", "batch_size", "lr", "hidden", "num_tasks", "train_limit",
                               "test_limit", "fisher_samples", "val_fraction")}
# The paper's method where dhp-train's default differs from it: η free (Algorithm 1). Every
# reproduction run sets these; an intervention variant (``~eta-bound``) overrides them.
PAPER_SETTINGS = {"eta_bound": False}
# Short names of the protocol options in run-directory names (``e2`` = 2 epochs per task).
PROTOCOL_TAGS = {"epochs": "e", "batch_size": "b", "lr": "lr", "hidden": "h", "num_tasks": "t",
                 "train_limit": "n", "test_limit": "m", "fisher_samples": "f", "val_fraction": "v"}
BASE_METHODS = METHODS  # the registered regularisers (dhp_deploy.regularizers.REGISTRY)
VARIANTS = tuple(name for m in BASE_METHODS
                 for name in (m, "dhp" if m == "finetune" else f"dhp+{m}"))
# The ablation that separates the two things "DHP" changes at once: each paper variant with the
# other head's θ init (``@authors`` on a plain head, ``@linear`` on a DHP head).
ABLATION_VARIANTS = tuple(f"{v}@{'linear' if v.startswith('dhp') else 'authors'}"
                          for v in VARIANTS)
INIT_DISPLAY = {"authors": "authors' init", "linear": "nn.Linear init"}
# Interventions on the DHP head (ours, not the paper's): a variant suffix ``~name`` and the
# TrainConfig settings it stands for.
INTERVENTIONS = {"eta-bound": {"eta_bound": True}, "trace-reset": {"trace_reset": True}}
# Protocol variants, a suffix of the same kind: ``~fixed-perms`` draws the ten permutations from
# one seed for every run, so that a seed varies only the init, batch order and subsets.
PROTOCOL_VARIANTS = {"fixed-perms": {"permutation_seed": 0}}
SUFFIXES = {**INTERVENTIONS, **PROTOCOL_VARIANTS}
# A suffix of the reproduction rather than of the training settings (a run's config cannot tell
# it): ``~dhp-strength`` trains DHP+X at the strength searched on the DHP network itself
# (strengths.json's BENCHMARK+dhp) instead of the plain head's. The run folder's name carries it
# into the run's summary, whose variant keeps it.
DHP_STRENGTH = "dhp-strength"
SUFFIX_DISPLAY = {"eta-bound": "η in [0, 1], ours", "trace-reset": "trace reset per task, ours",
                  "fixed-perms": "permutations fixed per task",
                  DHP_STRENGTH: "strength searched on the DHP network, ours"}
DISPLAY = {name: cls.display for name, cls in REGISTRY.items()}
BENCHMARK_ORDER = ("permuted-mnist", "imbalanced-permuted-mnist", "split-mnist",
                   "split-fashion-mnist")
PAPER_BENCHMARKS = ("permuted-mnist", "imbalanced-permuted-mnist", "split-mnist")
# Named groups of variants for --variants: the paper's table, the init ablation, both.
VARIANT_GROUPS = {"paper": VARIANTS, "ablation": ABLATION_VARIANTS,
                  "all": VARIANTS + ABLATION_VARIANTS}
# The trace study (reproduce.py trace): DHP on a shared head with its plain partners, with the
# trace diagnostics, and each intervention on the same DHP variants.
TRACE_PAIRS = (("finetune", "dhp"), ("online-ewc", "dhp+online-ewc"), ("si", "dhp+si"))
# Each intervention alone, then the two together (suffixes in SUFFIXES' order, as variant_name
# writes them); the study's default runs. The strength searched on the DHP network is reported
# where run (--variants dhp+si~dhp-strength: only where that search chose another strength).
STUDY_INTERVENTIONS = (*INTERVENTIONS, "~".join(INTERVENTIONS))
TRACE_TREATMENTS = (*STUDY_INTERVENTIONS, DHP_STRENGTH)
TRACE_VARIANTS = (tuple(name for pair in TRACE_PAIRS for name in pair)
                  + tuple(f"{dhp}~{name}" for name in STUDY_INTERVENTIONS
                          for _, dhp in TRACE_PAIRS))
TRACE_BENCHMARKS, TRACE_SEEDS = ("permuted-mnist",), tuple(range(10))
# The grid docs/RESULTS.md reports, per benchmark (a grid without --variants runs this): the
# whole ablation on Split MNIST; on the permuted benchmarks, whose runs cost ~4 min each, the
# ablation of Finetune and SI only (two method pairs answer what the θ init contributes).
PERMUTED_ABLATION = ("finetune@authors", "dhp@linear", "si@authors", "dhp+si@linear")
REPORTED_GRID = {"split-mnist": VARIANT_GROUPS["all"],
                 "permuted-mnist": VARIANTS + PERMUTED_ABLATION,
                 "imbalanced-permuted-mnist": VARIANTS + PERMUTED_ABLATION}


def grid_variants(benchmark: str, requested=None) -> tuple:
    r"""The variants a grid trains on ``benchmark``: those requested, else the reported grid's
    (the paper's table where the report has no grid of that benchmark)."""
    return tuple(requested) if requested else REPORTED_GRID.get(benchmark, VARIANTS)


def variant_name(method: str, dhp: bool, head_init: str | None = None,
                 training: dict | None = None) -> str:
    r"""``("ewc", True)`` → ``"dhp+ewc"``; ``("finetune", True)`` → ``"dhp"`` (the paper's);
    a head init other than the paper's for that head is a suffix: ``"dhp@linear"``; so is each
    intervention ``training`` holds: ``"dhp+si~eta-bound"``."""
    name = (("dhp" if method == "finetune" else f"dhp+{method}") if dhp else method)
    if head_init is not None and head_init != default_head_init(dhp):
        name += f"@{head_init}"
    for suffix, settings in SUFFIXES.items():
        if training and all(training.get(key) == value for key, value in settings.items()):
            name += f"~{suffix}"
    return name


def record_suffix(variant: str) -> str:
    r"""The reproduction's own suffix of a variant name as a job named it (``"~dhp-strength"``),
    which the run's training settings cannot tell; else ``""``."""
    return f"~{DHP_STRENGTH}" if DHP_STRENGTH in variant.split("~")[1:] else ""


def training_variant(training: dict) -> str:
    r"""The variant of a run's ``training`` config, read through TrainConfig's one migration
    (runs from before an option get the behaviour they ran with)."""
    config = _migrated(training)
    return variant_name(config["method"], config["dhp"], config["head_init"], config)


def _migrated(training: dict) -> dict:
    config = asdict(TrainConfig.from_json({"training": training}))
    return {**config, "hidden": list(config["hidden"])}


def display_name(variant: str) -> str:
    variant, *suffixes = variant.split("~")
    variant, _, init = variant.partition("@")
    notes = ([INIT_DISPLAY[init]] if init else []) + [SUFFIX_DISPLAY[name] for name in suffixes]
    suffix = f" ({'; '.join(notes)})" if notes else ""
    if variant == "dhp":
        return "DHP" + suffix
    if variant.startswith("dhp+"):
        return "DHP+" + DISPLAY[variant[4:]] + suffix
    return DISPLAY[variant] + suffix


def protocol_tag(training: dict) -> str:
    r"""``"paper"`` for the paper's protocol, else what differs (``"e2-n500"``)."""
    parts = []
    for name, short in PROTOCOL_TAGS.items():
        value = training.get(name)
        if isinstance(value, list):
            value = tuple(value)
        if value == PAPER_PROTOCOL[name]:
            continue
        if name == "hidden":
            value = "x".join(map(str, value))
        parts.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
    return "-".join(parts) or "paper"


def grid_protocol(training: dict) -> str:
    r"""The protocol name of the grid a run's settings serve (a search's, without its hold-out)."""
    return protocol_tag({**training, "val_fraction": 0.0})


def strengths_key(benchmark: str, protocol: str, dhp: bool = False) -> str:
    r"""The key of strengths.json for grids of ``benchmark`` under ``protocol``; ``dhp``: the
    strengths searched on the DHP network (``permuted-mnist+dhp``)."""
    key = benchmark + ("+dhp" if dhp else "")
    return key if protocol == "paper" else f"{key}@{protocol}"


def train_command(training: dict) -> str:
    r"""The ``dhp-train`` line that trains the run of ``training`` (a TrainConfig dict) alone."""
    # The defaults dhp-train would apply to this benchmark, method and head.
    default = TrainConfig(benchmark=training["benchmark"], method=training["method"],
                          dhp=training["dhp"])
    training = _migrated(training)
    words = ["dhp-train", "--benchmark", training["benchmark"], "--method", training["method"],
             "--dhp" if training["dhp"] else "--no-dhp"]
    for name, value in training.items():
        if name in ("benchmark", "method", "dhp", "download") or not hasattr(default, name):
            continue
        if name in ("eta_bound", "trace_reset") and not training["dhp"]:  # no DHP head
            continue
        if isinstance(value, list):
            value = tuple(value)
        if value == getattr(default, name):
            continue
        option = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):  # a value other than the default: --x or --no-x
            words.append(option if value else f"--no-{name.replace('_', '-')}")
        elif name == "hidden":
            words += [option, ",".join(map(str, value))]
        else:
            words += [option, f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(word for word in words if word) + " --out RUN_DIR"


def variant_settings(variant: str) -> dict:
    r"""The TrainConfig settings of a variant: ``"dhp+ewc"`` → method ewc, DHP head;
    ``"dhp"`` → finetune, DHP head; ``"si@authors"`` → si, plain head, the authors' θ init;
    ``"dhp~eta-bound"`` → finetune, DHP head, η kept in [0, 1]."""
    variant, *suffixes = variant.split("~")
    name, _, head_init = variant.partition("@")
    extra = {key: value for suffix in suffixes if suffix != DHP_STRENGTH
             for key, value in SUFFIXES[suffix].items()}
    if name == "dhp":
        settings = {"method": "finetune", "dhp": True}
    elif name.startswith("dhp+"):
        settings = {"method": name[4:], "dhp": True}
    else:
        settings = {"method": name, "dhp": False}
    return {**settings, "head_init": head_init or None, **extra}
