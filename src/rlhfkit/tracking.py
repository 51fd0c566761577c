"""Progress and metrics for long work: a bar with rate and ETA, metrics.jsonl and TensorBoard events
in the run dir, and wandb when it is installed and enabled. Only rank 0 writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm


class Tracker:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int = 0, desc: str = "train",
                 enabled: bool = True, show_progress: bool = True, config: dict | None = None):
        """desc: the stage's name; config: the resolved run config (its `wandb` section turns W&B on)."""
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._tb = self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; keep going without it if someone removed it
            self._tb = None
        wandb_args = wandb_init_args(config, desc)
        if wandb_args:
            try:
                import wandb

                self._wandb = wandb.init(**wandb_args)
            except ImportError:
                print("rlhfkit: wandb is enabled in the config but not installed; logging to JSONL and TensorBoard only")
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", disable=not show_progress,
                         dynamic_ncols=True)

    def log(self, step: int, metrics: dict, advance: bool = False) -> None:
        if not self.enabled:
            return
        # NaN/inf are logged as such (JSON's NaN/Infinity, as Python and pandas read them): a diverging run
        # must show in its metrics, not vanish from them.
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if not clean:
            if advance and self._bar is not None:
                self._bar.update(1)
            return
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb:
            self._wandb.log(clean, step=step)
        if self._bar is not None:
            shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in clean.items() if k in _BAR_KEYS}
            if shown:
                self._bar.set_postfix(shown, refresh=False)
            if advance:
                self._bar.update(1)

    def set_total(self, total: int) -> None:
        """The number of steps changed (a time budget planned fewer)."""
        if self._bar is not None and self._bar.total != total:
            self._bar.total = total
            self._bar.refresh()

    def write(self, text: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
        self._jsonl.close()


def wandb_init_args(config: dict | None, stage: str) -> dict | None:
    """wandb.init's arguments from a resolved config's `wandb` section; None when it names no project. Each
    stage is a W&B run named <wandb.name>/<stage>, the stages of one run in one group (both default to the
    name of run.output_dir), so runs of several output dirs tell themselves apart."""
    settings = (config or {}).get("wandb") or {}
    if not settings.get("project"):
        return None
    run = Path(config.get("run", {}).get("output_dir", ".")).resolve().name
    return {"project": settings["project"], "entity": settings.get("entity"), "group": settings.get("group") or run,
            "name": f"{settings.get('name') or run}/{stage}", "config": config, "resume": "allow"}


_BAR_KEYS = {"train/loss", "train/tokens_per_s", "train/accuracy", "train/lr"}


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
