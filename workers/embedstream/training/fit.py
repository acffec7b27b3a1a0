"""Fit the LSTM and the autoencoder on normal windows; save safetensors + JSON sidecar.

* Normalisation: per-channel mean and std of the training split's points, stored in the module.
* Split: the last ``holdout`` share of every series is held out (no window spans both parts).
* LSTM objective: next-step prediction (a linear head on every hidden state predicts the next
  normalised point); only the encoder is saved, the head is training scaffolding.
* Autoencoder objective: mean squared reconstruction error of the normalised, flattened window.
* Anomaly threshold: the ``threshold_quantile`` (default 99.5%) quantile of the reconstruction error
  on the held-out normal windows, so about 0.5% of normal windows are flagged by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedstream.encoders import Sidecar, sidecar_path
from embedstream.encoders.autoencoder import WindowAutoencoder
from embedstream.encoders.lstm import LSTMEncoder
from embedstream.errors import ConfigError
from embedstream.training.data import load_series, make_windows, split_holdout

log = logging.getLogger(__name__)

FAMILIES = ("lstm", "autoencoder")
Advance = Callable[[str, float], None]  # (what, loss) after each epoch


@dataclass(frozen=True)
class TrainConfig:
    window: int = 32
    stride: int = 4
    holdout: float = 0.2
    threshold_quantile: float = 0.995
    seed: int = 0
    batch_size: int = 64
    ae_hidden: int = 64
    latent: int = 8
    ae_epochs: int = 60
    ae_lr: float = 2e-3
    lstm_hidden: int = 16
    lstm_layers: int = 1
    lstm_epochs: int = 8
    lstm_lr: float = 1e-2
    # These nets are tiny: more threads only spin against each other on a shared CPU.
    threads: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ConfigError("holdout must be between 0 and 1")
        if not 0 < self.threshold_quantile < 1:
            raise ConfigError("threshold_quantile must be between 0 and 1")
        if min(self.window, self.stride, self.batch_size, self.ae_hidden, self.latent, self.lstm_hidden) < 1:
            raise ConfigError("window, stride, batch size and layer sizes must be positive")


@dataclass(frozen=True)
class Prepared:
    train: np.ndarray  # (M, T, C) windows
    held: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_names: tuple[str, ...]


def prepare(series: Sequence[np.ndarray], cfg: TrainConfig, channel_names: Sequence[str] = ()) -> Prepared:
    train_s, held_s = split_holdout(series, cfg.holdout)
    points = np.concatenate([s for s in train_s if len(s)])
    std = points.std(axis=0)
    # A constant channel would divide by zero; unit std keeps it at its (centred) value.
    std = np.where(std > 1e-6, std, 1.0)
    held = make_windows(held_s, cfg.window, cfg.stride)
    names = tuple(channel_names) or tuple(f"ch{i}" for i in range(points.shape[1]))
    return Prepared(
        make_windows(train_s, cfg.window, cfg.stride),
        held,
        tuple(float(v) for v in points.mean(axis=0)),
        tuple(float(v) for v in std),
        names,
    )


def _batches(n: int, size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    yield from order.split(size)


def _epoch(
    x: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
    opt: torch.optim.Optimizer,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
) -> float:
    """One pass over the shuffled windows; returns the mean loss per window."""
    total = 0.0
    for idx in _batches(len(x), batch_size, gen):
        loss = loss_of(x[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(x)


def fit_autoencoder(
    data: Prepared, cfg: TrainConfig, advance: Advance | None = None
) -> tuple[WindowAutoencoder, Sidecar]:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    _, window, channels = data.train.shape
    model = WindowAutoencoder(window, channels, cfg.ae_hidden, cfg.latent, data.mean, data.std)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.ae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.ae_epochs)
    x = torch.from_numpy(data.train)
    loss_value = float("nan")
    for _ in range(cfg.ae_epochs):
        model.train()
        loss_value = _epoch(x, cfg.batch_size, gen, opt, lambda batch: model.errors(batch)[1].mean())
        sched.step()
        if advance:
            advance("autoencoder", loss_value)
    model.eval()
    with torch.inference_mode():
        _, held_errors = model.errors(torch.from_numpy(data.held))
    held_err = held_errors.squeeze(1).numpy()
    threshold = float(np.quantile(held_err, cfg.threshold_quantile))
    model.threshold.fill_(threshold)
    side = Sidecar(
        family="autoencoder",
        window_length=window,
        channels=channels,
        hidden=cfg.ae_hidden,
        latent=cfg.latent,
        mean=data.mean,
        std=data.std,
        threshold=threshold,
        threshold_rule=_threshold_rule(cfg, len(held_err)),
        channel_names=data.channel_names,
        training=_summary(cfg, len(data.train), loss_value, float(held_err.mean()), cfg.ae_epochs),
    )
    return model, side


def fit_lstm(data: Prepared, cfg: TrainConfig, advance: Advance | None = None) -> tuple[LSTMEncoder, Sidecar]:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    _, window, channels = data.train.shape
    model = LSTMEncoder(channels, cfg.lstm_hidden, cfg.lstm_layers, data.mean, data.std)
    head = torch.nn.Linear(cfg.lstm_hidden, channels)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=cfg.lstm_lr)
    x = torch.from_numpy(data.train)

    def step_loss(batch: torch.Tensor) -> torch.Tensor:
        target = ((batch - model.mean) / model.std)[:, 1:]
        return ((head(model.sequence(batch)[:, :-1]) - target) ** 2).mean()

    loss_value = float("nan")
    for _ in range(cfg.lstm_epochs):
        model.train()
        loss_value = _epoch(x, cfg.batch_size, gen, opt, step_loss)
        if advance:
            advance("lstm", loss_value)
    model.eval()
    with torch.inference_mode():
        held_loss = float(step_loss(torch.from_numpy(data.held)))
    side = Sidecar(
        family="lstm",
        window_length=window,
        channels=channels,
        hidden=cfg.lstm_hidden,
        layers=cfg.lstm_layers,
        mean=data.mean,
        std=data.std,
        channel_names=data.channel_names,
        training={**_summary(cfg, len(data.train), loss_value, held_loss, cfg.lstm_epochs), "objective": "next_step"},
    )
    return model, side


def _threshold_rule(cfg: TrainConfig, holdout_windows: int) -> dict[str, object]:
    return {
        "kind": "quantile",
        "q": cfg.threshold_quantile,
        "of": "reconstruction_error on held-out normal windows",
        "holdout_windows": holdout_windows,
    }


def _summary(cfg: TrainConfig, windows: int, train_loss: float, held_loss: float, epochs: int) -> dict[str, object]:
    return {
        "windows": windows,
        "stride": cfg.stride,
        "epochs": epochs,
        "seed": cfg.seed,
        "final_train_loss": train_loss,
        "holdout_loss": held_loss,
    }


def save(model: torch.nn.Module, side: Sidecar, path: Path) -> Path:
    """``path`` (.safetensors) and its sidecar; tensors only, so loading never unpickles."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    side.write(sidecar_path(path))
    return path


@contextmanager
def _progress(enabled: bool, totals: dict[str, int]) -> Iterator[Advance | None]:
    if not enabled:
        yield None
        return
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # rich is in the optional `tools` extra; training needs no bar
        log.info("training without a progress bar: pip install 'embedstream[tools]' for one")
        yield None
        return

    with Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
    ) as bar:
        tasks = {name: bar.add_task(name, total=n, loss=float("nan")) for name, n in totals.items()}

        def advance(name: str, loss: float) -> None:
            bar.update(tasks[name], advance=1, loss=loss)

        yield advance


def train(
    series: Sequence[np.ndarray],
    out_dir: Path,
    families: Sequence[str] = FAMILIES,
    cfg: TrainConfig | None = None,
    channel_names: Sequence[str] = (),
    progress: bool = False,
) -> dict[str, Path]:
    """Fit the chosen families on normal series; returns the safetensors path of each."""
    cfg = cfg or TrainConfig()
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ConfigError(f"cannot train {sorted(unknown)}: known families are {FAMILIES}")
    data = prepare(series, cfg, channel_names)
    log.info(
        "training on %d windows, %d held out, window %d x %d", len(data.train), len(data.held), *data.train.shape[1:]
    )
    totals = {f: cfg.lstm_epochs if f == "lstm" else cfg.ae_epochs for f in families}
    out: dict[str, Path] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with _progress(progress, totals) as advance:
            for family in families:
                fit = fit_lstm if family == "lstm" else fit_autoencoder
                model, side = fit(data, cfg, advance)
                out[family] = save(model, side, Path(out_dir) / f"{family}.safetensors")
    finally:
        torch.set_num_threads(threads)
    return out


def train_from_file(
    path: Path,
    out_dir: Path,
    families: Sequence[str] = FAMILIES,
    cfg: TrainConfig | None = None,
    channels: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    series, names = load_series(path, channels)
    return train(series, out_dir, families, cfg, names, progress)
