"""``python -m residual_exp --help``: the usage, the tasks, every config group's options and a few
examples, generated from the catalog (task schemas, option specs, the config groups on Hydra's
search path) so that it is never out of date.  ``--hydra-help`` still prints Hydra's own flags."""
from __future__ import annotations

import textwrap

from .catalog import SPEC_TYPES, method_order, option, option_choices, options, spec

WIDTH = 100
GROUPS = {   # group -> what it chooses (options come from the config search path)
    "model": "the backbone (conf/model/NAME.yaml: family, architecture, weights)",
    "dataset": "the target dataset (dataset.root=DIR points at the data)",
    "method": "how the frozen model is adapted",
    "units": "which residual units a method reweights (units.layers, units.include, …; the method's file "
             "picks its default)",
    "rank": "how many principal components of each unit are kept (rank.evr, rank.k; the method's file picks "
            "its default)",
    "pca": "where the per-unit PCA bases are fitted",
    "trainer": "the training protocol (epochs, early stopping, precision)",
    "logger": "where curves and λ histograms go",
    "analysis": "the paper analysis of task=analysis",
    "hydra/launcher": "how a multirun (-m) runs its jobs",
}
EXAMPLES = [
    ("python -m residual_exp", "ResiDual on the embedded synthetic task (offline)"),
    ("python -m residual_exp method=residual_fine dataset=shapes_color", "another method and dataset"),
    ("python -m residual_exp -m method=base,residual_coarse,residual_full", "a sweep (one job per method)"),
    ("python -m residual_exp +experiment=paper/clip_b_cifar10 dataset.root=/data", "a paper run"),
    ("python -m residual_exp -m +experiment=ablation/rank trainer=fast", "an ablation sweep (then task=report "
                                                                        "sweep_dir=…)"),
    ("python -m residual_exp units=layers units.layers=[3,3] units.kinds=[head] rank=evr90", "layer-3 heads, 90% EVR"),
    ("python -m residual_exp model=open_clip model.arch=ViT-B-16-SigLIP classifier=prototype",
     "any open_clip tower (classifier=auto | text | prototype)"),
    ("python -m residual_exp task=plan +experiment=sweep/paper", "the cost of the paper's grid"),
    ("python -m residual_exp task=check_decomposition model=clip_b model.pretrained=null", "Σ units == feature?"),
    ("python -m residual_exp task=export run_dir=RUN", "a trained run as one adapted encoder"),
]


def _line(name: str, text: str, indent: int = 2, width: int = 22) -> str:
    head = " " * indent + f"{name:<{width}} "
    return textwrap.fill(text, WIDTH, initial_indent=head, subsequent_indent=" " * len(head))


def _describe(group: str, name: str) -> str:
    if group in SPEC_TYPES:
        try:
            return spec(group, name).description
        except Exception:                 # a broken option is validate's business, not --help's
            return ""
    return ""


def _presets() -> list[str]:
    paper, sweeps = options("experiment/paper"), options("experiment/sweep")
    models = [m for m in options("model") if any(p.startswith(m + "_") for p in paper)]
    datasets = {p[len(m) + 1:] for m in models for p in paper if p.startswith(m + "_")}
    out = []
    if paper:
        out.append(_line("paper/<model>_<dataset>", f"one paper run: {len(models)} models × {len(datasets)} datasets "
                                                    f"= {len(paper)} presets (models: {', '.join(models)}; datasets: "
                                                    f"{', '.join(sorted(datasets))})"))
    if sweeps:
        out.append(_line("sweep/<name>", "multirun grids (with -m): " + ", ".join(sweeps)))
    ablations = options("experiment/ablation")
    if ablations:
        out.append(_line("ablation/<name>", "ablation grids on the chosen model × dataset (with -m; task=report "
                                            "draws their figures): " + ", ".join(ablations)))
    return out


def help_text() -> str:
    from .config import TASKS
    defaults = option_choices("", "config")                       # conf/config.yaml's defaults list
    defaults.update(option_choices("method", defaults["method"]))  # the default method's units and rank
    out = ["usage: python -m residual_exp [-m] [task=NAME] [GROUP=OPTION ...] [key=value ...] [+experiment=PRESET]",
           "",
           textwrap.fill("ResiDual (arXiv 2411.00246): decompose a vision transformer into its residual units, fit "
                         "per-unit PCA bases, learn a spectral reweighting λ against a frozen zero-shot classifier, "
                         "and sweep it over models × datasets.", WIDTH),
           "", "tasks (task=NAME, default train):"]
    out += [_line(name, (schema.__doc__ or "").strip().splitlines()[0]) for name, schema in TASKS.items()]
    out += ["", "config groups (GROUP=OPTION; * marks the default):"]
    for group, what in GROUPS.items():
        names = method_order() if group == "method" else options(group)
        described = {n: _describe(group, n) for n in names}
        if not any(described.values()):                      # no specs: the options on one line
            listed = " | ".join(n + ("*" if defaults.get(group) == n else "") for n in names)
            out.append(_line(f"{group}:", f"{what}: {listed}", indent=2, width=20))
            continue
        out.append(f"  {group}: {what}")
        for name, text in described.items():
            star = "*" if defaults.get(group) == name else " "
            out.append(_line(f"{star} {name}", text, indent=4, width=20))
    out += ["", "presets (+experiment=PRESET):"] + _presets()
    out += ["", "examples:"] + [f"  {cmd}\n      # {what}" for cmd, what in EXAMPLES]
    out += ["", "keys: every config key can be set (method.lr=0.1, trainer.max_epochs=10); `--cfg job` prints the "
                "composed config, `--hydra-help` Hydra's own flags. A bad key or value is refused before any work "
                "with one `error:` line per problem (exit status 2). More: README.md."]
    return "\n".join(textwrap.fill(l, WIDTH, subsequent_indent="  ") if len(l) > WIDTH and not l.startswith(" ")
                     else l for l in out)


def method_table() -> str:
    """The README's methods table: each method's spec, and the units / rank its file chooses."""
    rows = ["| name | trains | acts on | units | rank | other units | parameters |",
            "|---|---|---|---|---|---|---|"]
    for name in method_order():
        s, node, groups = spec("method", name), option("method", name), option_choices("method", name)
        others = node.get("others", "drop") if s.acts_on == "units" else "–"
        rows.append(f"| `{name}` | {s.trained or '–'} | {s.acts_on} | {groups.get('units', '–')} | "
                    f"{groups.get('rank', '–') if s.needs_bases else '–'} | {others} | {s.params} |")
    return "\n".join(rows) + "\n"
