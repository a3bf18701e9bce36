"""Magnitude/direction analysis of fine-tuned weights (DoRA paper §3, Fig. 2).

For every adapted weight ``W ∈ R^{out×in}`` of a run and every saved checkpoint ``t``::

    m_t = ‖W_t‖ along the axis                   axis "out": (out,), one norm per output row
    ΔM_t = mean_i |m_t,i − m_0,i|                axis "in":  (in,),  one norm per input column
    ΔD_t = mean_i (1 − cos(W_t,i, W_0,i))        (i runs over rows for "out", columns for "in")

The paper writes ``W ∈ R^{d×k}`` with per-column norms (``m ∈ R^{1×k}``, our axis "in");
dorabooth's default magnitude axis, like PEFT's and NVlabs' code, is per output row, so
``--axis out`` is the default here too and every output names the axis it used.

``W_t`` is the weight the model actually uses: for DoRA and LoRA runs the merged weight of
the checkpoint's adapter at strength 1 (:func:`dorabooth.formats.neutral.adapted_weight`),
for full fine-tuning the weights themselves, restricted to the run's target modules so the
three methods are compared on the same layers. ``W_0`` is read from the run's base model.
Everything is computed in float64, and ``1 − cos`` as ``½‖u₀ − u‖²`` of the unit rows
(columns): for small updates ``1 − cos`` computed directly is below fp32 resolution.

Per run we fit ΔM = a + b·ΔD by least squares over all (layer, checkpoint) points and give
Pearson's r, overall and for the query projections (``to_q``/``q_proj``), the matrices the
paper plots. The paper reports b < 0 for full fine-tuning and DoRA, b > 0 for LoRA. Pooling
checkpoints mixes two things (both ΔM and ΔD grow with training), so each fit is repeated
``within_step``: with ΔM and ΔD centred per checkpoint, it measures the layer-to-layer
trade-off alone.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import rundir as rd
from .conventions import MAGNITUDE_AXES
from .events import EventLog
from .formats.adapter_files import read_adapter_file
from .formats.files import atomic_file, read_metadata, read_tensor, tensor_shapes, write_json
from .formats.layout import text_module
from .formats.neutral import adapted_weight
from .inject import TEXT_ENCODER_TARGETS, module_name, resolve_targets
from .models import TOY_ALIASES, TOY_MODEL, load_pipeline, weights_hash

QUERY_SUFFIXES = ("to_q", "q_proj")
AXIS_MEANING = {
    "out": "per output row of W (out, in): m = ||W[i, :]||, i = 1..out (dorabooth/PEFT/NVlabs axis)",
    "in": "per input column of W (out, in): m = ||W[:, j]||, j = 1..in (the paper's Eq. 2 notation)",
}
METHOD_NAMES = {"full": "FT", "lora": "LoRA", "dora": "DoRA", "dvora": "DVoRA"}


# =============================================================================================
# The measure and the fit
# =============================================================================================
@torch.no_grad()
def magnitude_direction(W0: torch.Tensor, W: torch.Tensor, axis: str = "out") -> tuple[float, float]:
    """(ΔM, ΔD) of ``W`` against ``W0`` (both (out, in), or a conv's (out, in, kh, kw)) along ``axis``
    (module docstring). A conv's vectors are those of its DoRA norm (:func:`dorabooth.dora.axis_norm`):
    per output channel over in×kh×kw ("out"), per input channel over out×kh×kw ("in")."""
    if axis not in MAGNITUDE_AXES:
        raise ValueError(f"axis must be 'out' (per output row) or 'in' (per input column), got {axis!r}")
    if W0.shape != W.shape or W0.ndim not in (2, 4):
        raise ValueError(f"need two (out, in) or (out, in, kh, kw) weights of one shape, got {tuple(W0.shape)} "
                         f"and {tuple(W.shape)}")
    W0, W = (w.double().movedim(0 if axis == "out" else 1, 0).reshape(w.shape[0 if axis == "out" else 1], -1)
             for w in (W0, W))                              # one row per magnitude entry
    dim = 1
    m0 = torch.linalg.vector_norm(W0, dim=dim)              # (out,) or (in,)
    m = torch.linalg.vector_norm(W, dim=dim)
    # 1 − cos(u, v) = ½‖u/‖u‖ − v/‖v‖‖²: no cancellation when the direction barely moves.
    u0 = W0 / m0.unsqueeze(dim).clamp_min(1e-300)
    u = W / m.unsqueeze(dim).clamp_min(1e-300)
    one_minus_cos = 0.5 * (u0 - u).square().sum(dim)       # (out,) or (in,)
    return float((m - m0).abs().mean()), float(one_minus_cos.mean())


def fit_line(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least-squares ``y = intercept + slope·x`` and Pearson's r; None where undefined."""
    n = len(x)
    if n != len(y):
        raise ValueError("x and y need the same length")
    out = {"n": n, "slope": None, "intercept": None, "pearson": None}
    if n < 2:
        return out
    xs = torch.tensor(x, dtype=torch.float64)
    ys = torch.tensor(y, dtype=torch.float64)
    dx, dy = xs - xs.mean(), ys - ys.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    if sxx == 0.0:
        return out
    slope = sxy / sxx
    out.update(slope=slope, intercept=float(ys.mean()) - slope * float(xs.mean()))
    if syy > 0.0:
        out["pearson"] = sxy / math.sqrt(sxx * syy)
    return out


def is_query(layer: str) -> bool:
    return layer.rsplit(".", 1)[-1] in QUERY_SUFFIXES


# =============================================================================================
# Reading a run folder
# =============================================================================================
@dataclass(frozen=True)
class RunInfo:
    path: Path
    method: str                      # dora | lora | full
    rank: int | None                 # the layers' rank (after --half-rank)
    half_rank: bool
    magnitude_axis: str | None       # the axis the run trained (DoRA only)
    seed: int | None
    lr: float | None
    steps: int | None
    targets: str
    base: str                        # the base model folder/file the weights come from
    base_hash: str | None = None     # its fingerprint when the run was trained
    text_encoders: bool = False      # the run trained the text encoders (adapters on them, or FT of them)

    @property
    def label(self) -> str:
        """"FT", "LoRA r=8", "DoRA r=8", "DoRA† r=4": what the plot's panels are called."""
        if self.method == "full":
            return "FT"
        dagger = "†" if self.half_rank else ""
        return f"{METHOD_NAMES.get(self.method, self.method)}{dagger} r={self.rank}"


def read_run(run: str | os.PathLike) -> RunInfo:
    """The facts of a run folder the analysis needs, from its ``config.json``."""
    return run_info(rd.read_run(run))


def run_info(r: rd.Run) -> RunInfo:
    c = r.config
    return RunInfo(path=r.path, method=c.method, rank=c.effective_rank, half_rank=c.half_rank,
                   magnitude_axis=c.magnitude_axis if c.method in ("dora", "dvora") else None, seed=c.seed, lr=c.lr,
                   steps=c.steps, targets=c.targets or "attn", base=r.base_weights, base_hash=r.base_hash,
                   text_encoders=bool(c.train_text_encoders))


def snapshots(info: RunInfo) -> list[tuple[int, Path]]:
    """(step, where its weights are) for every saved checkpoint and the final result, by step.

    DoRA/LoRA: ``checkpoints/step-N/adapter.safetensors`` and ``adapter.safetensors``; full:
    ``checkpoints/step-N/trainable.safetensors`` and ``unet/``. The final result counts as
    step ``config.steps`` (the trainer writes it only when the run finished)."""
    name = rd.TRAINABLE if info.method == "full" else rd.ADAPTER
    found = {step: rd.checkpoint_dir(info.path, step) / name for step in rd.checkpoint_steps(info.path, holding=name)}
    final = rd.final_result(info.path, info.method)
    if final.exists() and info.steps is not None:
        found[int(info.steps)] = final
    if not found:
        raise FileNotFoundError(f"{info.path}: no checkpoints ({rd.CHECKPOINTS}/step-N/{name}) and no final "
                                f"{final.name}; train first, with --checkpoint-every N to see the path over time")
    return sorted(found.items())


class BaseWeights:
    """``W0`` of module keys (``unet.<module>``, ``text_encoder.text_model.<module>``) of a base model.

    A diffusers folder is read tensor by tensor from its safetensors files; anything else
    (a single-file checkpoint, a hub id) loads the pipeline once through ``dorabooth.models``."""

    def __init__(self, base: str):
        self.base = base
        self._pipe = None
        folder = _local_folder(base)
        self.folder = folder

    def __call__(self, key: str) -> torch.Tensor:
        component, _, module = key.partition(".")
        if self.folder is not None:
            names = _weight_names(module)
            for file in sorted((self.folder / component).glob("*.safetensors")):
                t = read_tensor(file, names)
                if t is not None:
                    return t
        return self._from_pipeline(component, module, key)

    def _from_pipeline(self, component: str, module: str, key: str) -> torch.Tensor:
        if self._pipe is None:
            self._pipe, _ = load_pipeline(None if self.base == "toy" else self.base)
        model = getattr(self._pipe, component, None)
        if model is None:
            raise ValueError(f"base model {self.base} has no {component} (needed for {key})")
        try:
            return model.get_submodule(module_name(model, component, module)).weight.detach()
        except AttributeError:
            raise ValueError(f"{key} is not a Linear layer of base model {self.base}; the run was trained on "
                             f"another model") from None


def _local_folder(base: str) -> Path | None:
    p = TOY_MODEL if base in TOY_ALIASES else Path(base).expanduser()
    return p if p.is_dir() and (p / "model_index.json").is_file() else None


def _weight_names(module: str, prefix: str = "") -> list[str]:
    """The names ``module``'s weight may have in a file: a CLIP module with and without the
    ``text_model.`` level (transformers 5 models and files lack it)."""
    names = [f"{prefix}{module}.weight"]
    if module.startswith("text_model."):
        names.append(f"{prefix}{module.removeprefix('text_model.')}.weight")
    return names


def check_base(info: RunInfo) -> None:
    """W0 must be the weights the run started from: refuse a base folder that changed since."""
    folder = _local_folder(info.base)
    if info.base_hash is None or folder is None:
        return
    now = weights_hash(folder)
    if now.split(":")[0] == info.base_hash.split(":")[0] and now != info.base_hash:
        raise ValueError(f"{info.path}: its base model {folder} has changed since the run was trained (weights "
                         f"hash {info.base_hash[:20]}… then, {now[:20]}… now); ΔM and ΔD need the original W0. "
                         f"Restore that base model to analyse this run")


def full_target_modules(info: RunInfo) -> list[str]:
    """The module keys a full fine-tune is analysed on — the layers the adapters would adapt:
    ``unet.<module>`` for the run's ``targets`` (default ``attn``) resolved by
    :func:`dorabooth.inject.resolve_targets` on a stand-in of the base UNet (its 2-D weights as
    meta-device ``nn.Linear`` modules, read from file headers only), and, when the run trained
    the text encoders, their attention projections (``text_encoder*.text_model.…q/k/v/out_proj``)."""
    from torch import nn

    folder = _local_folder(info.base)
    if folder is None:
        raise ValueError(f"analysing a full fine-tune needs the base model as a local diffusers folder; "
                         f"{info.base} is not one")
    root = nn.Module()
    for file in sorted((folder / "unet").glob("*.safetensors")):
        for key, shape in tensor_shapes(file, "base model weights").items():
            if key.endswith(".weight") and len(shape) == 2:
                _add_linear(root, key[: -len(".weight")], shape)
    unet = [f"unet.{n}" for n in resolve_targets(root, info.targets)]
    return unet + (_text_encoder_targets(folder) if info.text_encoders else [])


def _text_encoder_targets(folder: Path) -> list[str]:
    out = []
    for te in sorted(d for d in folder.glob("text_encoder*") if d.is_dir()):
        for file in sorted(te.glob("*.safetensors")):
            for key in read_metadata(file, "base model weights")[0]:
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and module.endswith(TEXT_ENCODER_TARGETS):
                    out.append(f"{te.name}.{text_module(module)}")
    return sorted(out)


def _add_linear(root, name: str, shape) -> None:
    from torch import nn

    *parents, leaf = name.split(".")
    module = root
    for p in parents:
        if not hasattr(module, p):
            module.add_module(p, nn.Module())
        module = getattr(module, p)
    module.add_module(leaf, nn.Linear(shape[1], shape[0], bias=False, device="meta"))


def snapshot_weights(info: RunInfo, path: Path, modules: Sequence[str] | None,
                     base: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module key: W_t}`` of one snapshot: merged adapter weights, or a full fine-tune's weights."""
    if info.method != "full":
        adapter = read_adapter_file(path)
        return {k: adapted_weight(base(k), mod, 1.0) for k, mod in sorted(adapter.modules.items())}
    out = {}
    for k in modules:
        component, _, module = k.partition(".")
        if path.is_dir():                                    # the final unet/ (text_encoder*/ beside it)
            names, files = _weight_names(module), sorted((path.parent / component).glob("*.safetensors"))
        else:                                                # a checkpoint's trainable.safetensors
            names, files = _weight_names(module, prefix=f"{component}."), [path]
        for f in files:
            t = read_tensor(f, names)
            if t is not None:
                out[k] = t
                break
        else:
            raise ValueError(f"{path}: no weight for {k}")
    return out


# =============================================================================================
# Analysis
# =============================================================================================
def analyze_run(run: str | os.PathLike, *, axis: str = "out", on_event=None) -> dict:
    """ΔM/ΔD of every adapted weight at every snapshot of ``run``, and the fits (module docstring)."""
    emit = EventLog(None, on_event)
    info = read_run(run)
    snaps = snapshots(info)
    check_base(info)
    base = BaseWeights(info.base)
    modules = full_target_modules(info) if info.method == "full" else None
    w0_cache: dict[str, torch.Tensor] = {}

    def w0(key):
        if key not in w0_cache:
            w0_cache[key] = base(key).float()
        return w0_cache[key]

    points = []
    for step, path in snaps:
        for layer, W in snapshot_weights(info, path, modules, w0).items():
            dM, dD = magnitude_direction(w0(layer), W, axis)
            points.append({"layer": layer, "step": step, "dM": dM, "dD": dD, "query": is_query(layer)})
        emit("analyze", run=str(info.path), step=step)
    return {
        "run": str(info.path), "label": info.label, "method": info.method, "rank": info.rank,
        "half_rank": info.half_rank, "trained_magnitude_axis": info.magnitude_axis, "seed": info.seed,
        "lr": info.lr, "steps": [s for s, _ in snaps], "layers": len({p["layer"] for p in points}),
        "fit": fits(points), "points": points,
    }


def fits(points: Sequence[Mapping]) -> dict:
    """The ΔM-on-ΔD fit over all points, the query projections only and the UNet layers only
    (what a full fine-tune is measured on, so methods compare on the same layers), each also
    ``within_step``: ΔM and ΔD centred per checkpoint first, so the slope says how layers
    trade magnitude against direction at one time, not that both grow as training goes on."""
    q = [p for p in points if p["query"]]
    u = [p for p in points if p["layer"].startswith("unet.")]
    return {"all": fit_line([p["dD"] for p in points], [p["dM"] for p in points]),
            "query": fit_line([p["dD"] for p in q], [p["dM"] for p in q]),
            "unet": fit_line([p["dD"] for p in u], [p["dM"] for p in u]),
            "all_within_step": fit_line(*_centred_per_step(points)),
            "query_within_step": fit_line(*_centred_per_step(q)),
            "unet_within_step": fit_line(*_centred_per_step(u))}


def _centred_per_step(points: Sequence[Mapping]) -> tuple[list[float], list[float]]:
    by_step: dict[int, list[Mapping]] = {}
    for p in points:
        by_step.setdefault(p["step"], []).append(p)
    xs, ys = [], []
    for group in by_step.values():
        mx = sum(p["dD"] for p in group) / len(group)
        my = sum(p["dM"] for p in group) / len(group)
        xs += [p["dD"] - mx for p in group]
        ys += [p["dM"] - my for p in group]
    return xs, ys


def analyze(runs: Sequence[str | os.PathLike], out: str | os.PathLike, *, axis: str = "out",
            plot_layers: str = "query", on_event=None) -> dict:
    """Analyse ``runs``, write ``out/analysis.json`` and ``out/analysis.png``; returns the JSON data.

    Runs with the same label (method and rank; e.g. several seeds) share a plot panel and a
    pooled fit under ``panels``; every run also has its own fit."""
    if not runs:
        raise ValueError("give at least one run folder")
    if plot_layers not in ("query", "all"):
        raise ValueError(f"plot_layers must be 'query' or 'all', got {plot_layers!r}")
    results = [analyze_run(r, axis=axis, on_event=on_event) for r in runs]
    panels: dict[str, list[dict]] = {}
    for r in results:
        panels.setdefault(r["label"], []).append(r)
    data = {
        "definition": {
            "dM": "mean over i of |m_t,i - m_0,i|, m = norm of W along the axis",
            "dD": "mean over i of 1 - cos(W_t,i, W_0,i)",
            "W_t": "merged weight at strength 1 (DoRA, LoRA) or the fine-tuned weight (full)",
            "fit": "least squares dM = intercept + slope * dD over (layer, step) points; pearson = Pearson r",
            "within_step": "the same fit after subtracting each step's mean dM and dD",
            "query": f"layers named {' or '.join(QUERY_SUFFIXES)}",
            "unet": "UNet layers only (full fine-tuning changes no text-encoder weight)",
        },
        "axis": axis, "axis_meaning": AXIS_MEANING[axis],
        "runs": results,
        "panels": [{"label": label, "runs": [r["run"] for r in rs],
                    "fit": fits([p for r in rs for p in r["points"]])} for label, rs in panels.items()],
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data["plot"] = str(plot(data, out / "analysis.png", layers=plot_layers))
    write_json(out / "analysis.json", data)
    return data


def plot(data: Mapping, path: str | os.PathLike, *, layers: str = "query") -> Path:
    """The paper's Fig. 2 style: ΔD on x, ΔM on y, colour = step, one panel per method label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = data["panels"]
    by_run = {r["run"]: r for r in data["runs"]}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.9), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        pts = [p for run in panel["runs"] for p in by_run[run]["points"]]
        chosen = [p for p in pts if p["query"]] if layers == "query" else pts
        which = layers
        if not chosen:                                       # no query projections adapted: show all
            chosen, which = pts, "all"
        sc = ax.scatter([p["dD"] for p in chosen], [p["dM"] for p in chosen], c=[p["step"] for p in chosen],
                        cmap="viridis", s=22, edgecolors="none")
        bar = fig.colorbar(sc, ax=ax, label="step")
        bar.locator = matplotlib.ticker.MaxNLocator(integer=True)
        bar.update_ticks()
        fit = panel["fit"]["query" if which == "query" else "all"]
        if fit["slope"] is not None:
            xs = [min(p["dD"] for p in chosen), max(p["dD"] for p in chosen)]
            ax.plot(xs, [fit["intercept"] + fit["slope"] * x for x in xs], "k--", lw=1)
        slope = "n/a" if fit["slope"] is None else f"{fit['slope']:.3g}"
        r = "n/a" if fit["pearson"] is None else f"{fit['pearson']:.2f}"
        ax.set_title(f"{panel['label']} ({len(panel['runs'])} run{'s' * (len(panel['runs']) > 1)})\n"
                     f"slope {slope}, r = {r} [{which}]", fontsize=9, pad=14)   # room for the axis offset (1e-3)
        ax.set_xlabel("ΔD (mean 1 − cos)")
        ax.set_ylabel("ΔM (mean |m_t − m_0|)")
        ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 3))
    title = f"Magnitude vs direction change; norms {data['axis_meaning'].split(':')[0]} (axis '{data['axis']}')"
    fig.suptitle(textwrap.fill(title, width=int(15 * 4.2 * len(panels))), fontsize=9)   # ~15 chars/inch at 9 pt
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def summary_table(data: Mapping) -> str:
    """One line per run: label, seed, lr, points, then slope and r of the fits (all layers,
    query projections, query projections within step)."""
    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    cols = (("all", "all"), ("query", "q"), ("query_within_step", "q|step"))
    head = f"{'run':<28} {'label':<12} {'seed':>4} {'lr':>8} {'points':>6}" + "".join(
        f"  {'slope ' + short:>12} {'r ' + short:>8}" for _, short in cols)
    rows = [f"axis '{data['axis']}': {data['axis_meaning']}", head]
    for r in data["runs"]:
        line = f"{Path(r['run']).name[:28]:<28} {r['label']:<12} {f(r['seed'], 'd'):>4} {f(r['lr'], '.0e'):>8} " \
               f"{r['fit']['all']['n']:>6}"
        for key, _ in cols:
            fit = r["fit"][key]
            line += f"  {f(fit['slope'], '.3g'):>12} {f(fit['pearson'], '.2f'):>8}"
        rows.append(line)
    return "\n".join(rows)


__all__ = ["magnitude_direction", "fit_line", "analyze_run", "analyze", "plot", "summary_table", "read_run",
           "snapshots", "AXIS_MEANING"]
