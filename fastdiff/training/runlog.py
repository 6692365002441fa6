"""What a run reports: device-side running means, log.jsonl (torn-line tolerant) and the loss plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastdiff.files import atomic_write, pyplot, save_figure


class Meter:
    """Device-side running means (no host sync per step), per timestep quartile where t is given."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def _acc(self, name: str, s: torch.Tensor, c: torch.Tensor) -> None:
        if name in self.sums:
            self.sums[name] += s
            self.counts[name] += c
        else:
            self.sums[name], self.counts[name] = s.clone(), c.clone()

    def add(self, name: str, value) -> None:
        value = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1)
        self._acc(name, value, torch.ones_like(value))

    def add_per_t(self, name: str, values: torch.Tensor, t: torch.Tensor, num_timesteps: int) -> None:
        """Overall mean plus ``name_q0..q3`` by ``int(4 t / T)``, as guided-diffusion's logger."""
        values = values.detach().double()
        q = (4 * t // num_timesteps).clamp(max=3)
        s = torch.zeros(5, dtype=torch.float64, device=values.device).scatter_add_(0, q, values)
        c = torch.zeros(5, dtype=torch.float64, device=values.device).scatter_add_(
            0, q, torch.ones_like(values)
        )
        s[4], c[4] = values.sum(), len(values)
        self._acc(name, s, c)

    def state_dict(self) -> dict:
        """The means not yet flushed, so a run resumed between two log rows writes the same row."""
        return {
            "sums": {k: v.cpu() for k, v in self.sums.items()},
            "counts": {k: v.cpu() for k, v in self.counts.items()},
        }

    def load_state_dict(self, state: dict, device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.counts = {k: v.to(device) for k, v in state["counts"].items()}

    def flush(self) -> dict[str, float]:
        out = {}
        for name, s in self.sums.items():
            s, c = s.cpu().tolist(), self.counts[name].cpu().tolist()
            if len(s) == 1:
                out[name] = s[0] / c[0]
            else:
                out[name] = s[4] / c[4]
                out.update({f"{name}_q{i}": s[i] / c[i] for i in range(4) if c[i]})
        self.sums.clear()
        self.counts.clear()
        return out


def log_rows(path: Path) -> list[dict]:
    """The rows of log.jsonl; a torn line (kill, full disk) is dropped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows past the resumed step (they are about to be redone), and torn lines."""
    if path.is_file():
        rows = [json.dumps(r) for r in log_rows(path) if r["step"] <= step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))


def plot_losses(log_path: Path, png_path: Path) -> bool:
    """Loss (and its timestep quartiles) against step; False when matplotlib or the log is missing."""
    plt = pyplot()
    if plt is None or not Path(log_path).is_file():
        return False
    rows = log_rows(Path(log_path))
    keys = [
        k
        for k in ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "val_loss")
        if any(k in r for r in rows)
    ]
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot(*zip(*pts), label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png_path, dpi=100)
    return True
