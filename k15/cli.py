"""`k15 train [key=value ...]`: Hydra-composed config, one clear line for any startup error."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

USAGE = """usage: k15 train [key=value ...]

  k15 train                                  the embedded default: tiny model, built-in task, local Ray
  k15 train algo.tau=0.05 rollout.num_workers=2
  k15 train model=hf model.path=/models/my-lm data.source=prompts.jsonl
  k15 train --cfg                            print the composed config and exit
"""


class ConfigError(ValueError):
    pass


def compose_config(overrides: list[str]):
    """Compose conf/ with the overrides and check it against the schema in k15/config.py."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import k15.conf
    from k15.config import K15Config

    ConfigStore.instance().store(name="k15_schema", node=K15Config)
    conf_dir = os.path.dirname(os.path.abspath(k15.conf.__file__))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from None
    return cfg


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    text = text.replace(" To append to your config use", " (unknown key; to add a new key use")
    if "(unknown key" in text and not text.endswith(")"):
        text += ")"
    if e.__cause__ is not None:  # Hydra wraps the reason (which key, which type) in the cause
        text += ": " + " ".join(str(e.__cause__).split())
    for cut in ("full_key:", "object_type="):
        text = text.split(cut)[0].strip()
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "train":
        print(f"k15: unknown command '{command}'\n{USAGE}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="k15 train", add_help=False)
    parser.add_argument("--cfg", action="store_true")
    args, overrides = parser.parse_known_args(rest)
    try:
        return train(overrides, print_config=args.cfg)
    except KeyboardInterrupt:
        print("k15: interrupted", file=sys.stderr)
        return 130
    except StartupError as e:
        print(f"k15: error: {e}", file=sys.stderr)
        return 1


class StartupError(Exception):
    pass


def train(overrides: list[str], print_config: bool = False) -> int:
    from omegaconf import OmegaConf

    from k15.data.dataset import DatasetError, load_datasets
    from k15.models import ModelNotFoundError, load_policy_tokenizer
    from k15.reward.verifiers import RewardConfig

    try:
        cfg = compose_config(overrides)
    except ConfigError as e:
        raise StartupError(f"config: {e}") from None
    if print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    # Check inputs before starting anything heavy, so a bad path fails in a second.
    try:
        if cfg.model.path and not Path(cfg.model.path).is_dir():
            raise ModelNotFoundError(f"model directory not found: {cfg.model.path}")
        load_policy_tokenizer(cfg.model)
        load_datasets(cfg.data, cfg.seed)
        RewardConfig.from_dict(cfg.reward)
    except (DatasetError, ModelNotFoundError, FileNotFoundError, OSError, ValueError, TypeError) as e:
        raise StartupError(str(e)) from None

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from k15.controller import Controller
    from k15.metrics import console

    run_dir = Path(cfg.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    start = time.perf_counter()
    controller = Controller(cfg, run_dir)
    summary = controller.run()
    ray_stop()
    summary["wall_seconds"] = time.perf_counter() - start
    plot = controller.logger.plot()
    controller.logger.log({"summary": True, **{k: v for k, v in summary.items() if not isinstance(v, dict)}})
    rows = [("held-out accuracy before RL", _pct(summary.get("accuracy_before"))),
            ("held-out accuracy after RL", _pct(summary.get("accuracy_after"))),
            ("warm-up seconds", f"{summary.get('warmup_seconds', 0):.1f}"),
            ("RL seconds", f"{summary['rl_seconds']:.1f}"),
            ("trained samples", str(summary["trained_samples"])),
            ("wall seconds", f"{summary['wall_seconds']:.1f}"),
            ("run dir", str(run_dir)), ("plot", str(plot))]
    controller.logger.summary_table(rows)
    controller.logger.finish()
    console.print(f"metrics: {run_dir / 'metrics.jsonl'}")
    return 0


def ray_stop() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
