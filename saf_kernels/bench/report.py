"""Tables, JSON and a PNG chart for ``python -m saf_kernels.bench``."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys

import torch

from .. import _backend


def environment(device: torch.device) -> dict:
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "extension": "built" if _backend.HAS_EXT else f"missing ({_backend.EXT_ERROR})",
        "cuda_kernels": _backend.has_cuda_kernels(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.3f} ms"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def op_table(rows: list[dict]) -> str:
    """One line per (op, case, fused provider): time, speed-up over eager and over compile."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("kind") == "op":
            by_case.setdefault((r["op"], r["case"]), {})[r["provider"]] = r
    lines, notes = [], {}
    for (op, case), provs in by_case.items():
        eager = provs.get("eager", {}).get("median_s")
        comp = provs.get("compile", {}).get("median_s")
        for name, r in provs.items():
            if name in ("eager", "compile"):
                continue
            if "unavailable" in r or "error" in r:
                notes.setdefault((name, r.get("unavailable") or r.get("error")), []).append(f"{op} {case}")
                continue
            t = r["median_s"]
            lines.append([
                op, case, name, _fmt_time(t), _fmt_time(eager), _fmt_time(comp),
                f"{eager / t:.2f}x" if eager else "-", f"{comp / t:.2f}x" if comp else "-",
                f"{r['gbps']:.1f}", f"{100 * r['floor_share']:.0f}%" if "floor_share" in r else "-",
            ])
    text = _table(["op", "case", "provider", "fused", "eager", "compile", "vs eager", "vs compile", "GB/s",
                   "of floor"], lines)
    if notes:
        text += "\n\nNot measured:\n" + "\n".join(
            f"  - {name} ({len(cases)} cases): {why}" for (name, why), cases in notes.items()
        )
    return text


def soft_table(rows: list[dict]) -> str:
    """Probability targets beside class indices, per case and backend: saf_loss with soft targets
    in one pass against the two-pass way (F.cross_entropy on the probabilities + the fused KL),
    and the bank step with soft against index targets."""
    t = {(r["op"], r["case"], r["provider"]): r.get("median_s") for r in rows if r.get("kind") == "op"}
    lines = []
    for (op, case, prov), soft in t.items():
        if op not in ("saf_loss_soft", "saf_bank_step_soft") or not prov.startswith("saf_kernels[") or not soft:
            continue
        index = t.get((op[: -len("_soft")], case, prov))
        split = t.get((op, case, "ce+kl" + prov[len("saf_kernels"):]))
        lines.append([op[: -len("_soft")], case, prov, _fmt_time(index), _fmt_time(soft), _fmt_time(split),
                      f"{split / soft:.2f}x" if split else "-", f"{soft / index:.2f}x" if index else "-"])
    return _table(["op", "case", "provider", "index targets", "soft, one pass", "ce+kl (two passes)",
                   "two passes / one", "soft / index"], lines)


def method_table(rows: list[dict]) -> str:
    lines, notes = [], []
    for r in rows:
        if r.get("kind") != "method":
            continue
        if "unavailable" in r or "error" in r:
            notes.append(f"{r['method']}: {r.get('unavailable') or r.get('error')}")
            continue
        mem = r.get("peak_mem_bytes")
        lines.append([r["method"], _fmt_time(r["median_s"]), f"{r['ratio_to_sgd']:.3f}x",
                      f"{mem / 2**20:.1f} MiB" if mem is not None else "-", r.get("note", "")])
    text = _table(["method", "step", "vs SGD", "peak memory", "note"], lines)
    if notes:
        text += "\n\nNot measured:\n" + "\n".join(f"  - {n}" for n in notes)
    return text


def render(env: dict, rows: list[dict], sections: dict[str, str]) -> str:
    head = (f"saf_kernels benchmark | {env['device_name']} ({env['device']}, {env['threads']} threads) | "
            f"torch {env['torch']} | triton {env['triton']} | commit {env['commit']} | {env['date']}")
    parts = [head, "=" * min(len(head), 120)]
    for title, body in sections.items():
        parts += ["", title, body]
    return "\n".join(parts)


def write_json(path: str, env: dict, rows: list[dict], text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "results": rows, "table": text}, f, indent=1, default=str)


def write_plot(path: str, rows: list[dict]) -> str | None:
    """Bar chart of each method's step time relative to SGD and each fused op's speed-up."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    methods = [r for r in rows if r.get("kind") == "method" and "ratio_to_sgd" in r]
    ops = {}
    for r in rows:
        if r.get("kind") == "op" and "median_s" in r:
            ops.setdefault((r["op"], r["case"]), {})[r["provider"]] = r["median_s"]
    speedups = []
    for (op, case), p in ops.items():
        for name, t in p.items():
            if name.startswith("saf_kernels") and "eager" in p:
                speedups.append((f"{op}\n{case}\n{name[12:-1]}", p["eager"] / t))
    n = (1 if methods else 0) + (1 if speedups else 0)
    if n == 0:
        return "nothing to plot"
    fig, axes = plt.subplots(1, n, figsize=(7 * n, 4.5), squeeze=False)
    ax_i = 0
    if methods:
        ax = axes[0][ax_i]
        ax_i += 1
        ax.bar([m["method"] for m in methods], [m["ratio_to_sgd"] for m in methods], color="#4c72b0")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("step time / SGD step time")
        ax.set_title("Training-step overhead")
    if speedups:
        ax = axes[0][ax_i]
        ax.bar(range(len(speedups)), [s for _, s in speedups], color="#55a868")
        ax.set_xticks(range(len(speedups)), [n for n, _ in speedups], fontsize=6)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("speed-up over eager PyTorch")
        ax.set_title("Fused ops (forward + backward)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return None


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int = 0, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = sys.stderr.isatty()

    def add(self, n: int) -> None:
        self.total += n

    def __call__(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = min(1.0, self.done / max(self.total, 1))
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        msg = f"[{bar}] {self.done}/{self.total} {what}"
        if self.tty:
            sys.stderr.write("\r" + msg[:150].ljust(150))
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
