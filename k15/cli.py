"""`k15 train|eval|curate|long2short [key=value ...]`: Hydra-composed config, one clear line for any
startup error."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

USAGE = """usage: k15 {train,eval,curate,long2short,serve} [key=value ...]

  k15 train                                  the embedded default: tiny model, built-in task, local Ray
  k15 train algo.tau=0.05 rollout.num_workers=2
  k15 train model=hf model.path=/models/my-lm data.source=prompts.jsonl
  k15 train resume=runs/x                    continue a run from its newest checkpoint (or resume=latest)
  k15 eval model.path=runs/x/checkpoint      pass@k, lengths, per-difficulty accuracy (built-in held-out set)
  k15 eval eval.source=problems.jsonl eval.samples=16 eval.ks=[1,4,16]
  k15 curate curate.source=problems.jsonl    drop unverifiable / easy-to-hack problems, label difficulty
  k15 long2short method=rl model.path=runs/x/checkpoint       short CoT from long: merge|shortest|dpo|rl
  k15 long2short method=merge model.path=LONG long2short.short_model=SHORT long2short.merge_weights=[0.7,0.3]
  k15 serve model.path=runs/x/checkpoint serve.port=8000   OpenAI-compatible API (/v1/completions, /v1/chat/completions)
  k15 serve model.path=runs/x/checkpoint serve.follow=runs/x   served weights follow that run's checkpoints
  k15 <command> --cfg                        print the composed config and exit
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
    commands = {"train": train, "eval": eval_command, "curate": curate_command, "long2short": long2short_command,
                "serve": serve_command}
    if command not in commands:
        print(f"k15: unknown command '{command}'\n{USAGE}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"k15 {command}", add_help=False)
    parser.add_argument("--cfg", action="store_true")
    args, overrides = parser.parse_known_args(rest)
    try:
        return commands[command](overrides, print_config=args.cfg)
    except KeyboardInterrupt:
        print("k15: interrupted", file=sys.stderr)
        return 130
    except StartupError as e:
        print(f"k15: error: {e}", file=sys.stderr)
        return 1


class StartupError(Exception):
    pass


def train(overrides: list[str], print_config: bool = False) -> int:
    from k15.checkpoint import CheckpointError
    from k15.resume import ResumeError, check_compatible, resume_overrides, resume_value

    ckpt = None
    if resume_value(overrides):
        try:
            overrides, ckpt = resume_overrides(overrides)
        except CheckpointError as e:
            raise StartupError(str(e)) from None
    cfg = _setup(overrides, print_config)
    if cfg is None:
        return 0
    if ckpt is not None:
        try:
            check_compatible(cfg, ckpt)
        except (ResumeError, OSError) as e:
            raise StartupError(str(e)) from None
    return _run_training(cfg, overrides)


def _run_training(cfg, overrides: list[str] = ()) -> int:
    """The RL loop of `k15 train` (also long2short's rl method), its summary table and plot. If the
    trainer or the buffer dies, the run goes on from its newest intact checkpoint (at most
    checkpoint.max_failures times)."""
    from omegaconf import OmegaConf

    from k15 import checkpoint
    from k15.algo.sampler import make_sampler
    from k15.atomic import atomic_write_text
    from k15.resume import save_overrides
    from k15.data.dataset import DatasetError, load_datasets
    from k15.trainer.worker import policy_loss

    try:  # the prompt set, the sampler over it and the loss, before anything heavy starts
        train_set, _ = load_datasets(cfg.data, cfg.seed)
        make_sampler(cfg.sampler, train_set, cfg.seed)
        policy_loss(cfg.algo)
    except (DatasetError, OSError, ValueError) as e:
        raise StartupError(str(e)) from None

    import ray

    from k15.controller import Controller, RunFailed
    from k15.metrics import console

    run_dir = Path(cfg.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = Path(cfg.resume) if cfg.resume else None
    if resume_from is None:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    save_overrides(run_dir, list(overrides))
    start = time.perf_counter()
    for failures in range(cfg.checkpoint.max_failures + 1):
        controller = Controller(cfg, run_dir, resume_from)
        try:
            summary = controller.run()
            controller.close()
            break
        except (RunFailed, ray.exceptions.RayActorError) as e:
            controller.close()
            controller.logger.finish()
            ray_stop()
            resume_from = checkpoint.newest_intact(run_dir)
            if resume_from is None or failures == cfg.checkpoint.max_failures:
                why = "no intact checkpoint to restart from" if resume_from is None else \
                    f"it failed {failures + 1} times (checkpoint.max_failures={cfg.checkpoint.max_failures})"
                raise StartupError(f"{e}; the run stops: {why}") from None
            console.print(f"[red]{e}[/]\n[yellow]restarting from {resume_from} "
                          f"(failure {failures + 1} of at most {cfg.checkpoint.max_failures})[/]")
    ray_stop()
    summary["wall_seconds"] = time.perf_counter() - start
    plot = controller.logger.plot()
    controller.logger.log({"summary": True, **{k: v for k, v in summary.items() if not isinstance(v, dict)}})
    rows = [("held-out accuracy before RL", _pct(summary.get("accuracy_before"))),
            ("held-out accuracy after RL", _pct(summary.get("accuracy_after"))),
            ("warm-up seconds", f"{summary.get('warmup_seconds', 0):.1f}"),
            ("RL seconds", f"{summary['rl_seconds']:.1f}"),
            ("trained samples", str(summary["trained_samples"])),
            ("rollout actor failures recovered", str(summary.get("rollout_failures", 0))),
            ("wall seconds", f"{summary['wall_seconds']:.1f}"),
            ("run dir", str(run_dir)), ("plot", str(plot))]
    controller.logger.summary_table(rows)
    controller.logger.finish()
    console.print(f"metrics: {run_dir / 'metrics.jsonl'}")
    return 0


def _setup(overrides: list[str], print_config: bool):
    """The composed config, with the model, tokenizer and reward settings checked before anything
    heavy starts, so a bad path fails in a second (None: --cfg printed the config)."""
    from omegaconf import OmegaConf

    from k15.models import ModelNotFoundError, load_policy_tokenizer
    from k15.reward.verifiers import RewardConfig

    try:
        cfg = compose_config(overrides)
    except ConfigError as e:
        raise StartupError(f"config: {e}") from None
    if print_config:
        print(OmegaConf.to_yaml(cfg))
        return None
    try:
        if cfg.model.path and not Path(cfg.model.path).is_dir():
            raise ModelNotFoundError(f"model directory not found: {cfg.model.path}")
        if cfg.model.path and not (Path(cfg.model.path) / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {cfg.model.path} has no config.json (not a Hugging Face model)")
        load_policy_tokenizer(cfg.model)
        RewardConfig.from_dict(cfg.reward)
    except (ModelNotFoundError, FileNotFoundError, OSError, ValueError, TypeError) as e:
        raise StartupError(str(e)) from None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return cfg


def _load_records(source, default, limit):
    """Records of a prompt file, or `default()`; the first `limit` of them."""
    from k15.data.dataset import DatasetError, load_prompt_file

    try:
        records = load_prompt_file(source) if source else default()
    except (DatasetError, OSError) as e:
        raise StartupError(str(e)) from None
    return records[:limit] if limit is not None else records


def _warn_default_model(cfg) -> None:
    if not cfg.model.path:
        print("k15: warning: model.path is not set: using the untrained default model", file=sys.stderr)


def _positive(**values) -> None:
    for key, value in values.items():
        if value < 1:
            raise StartupError(f"config: {key} must be >= 1, got {value}")


def eval_command(overrides: list[str], print_config: bool = False) -> int:
    """`k15 eval`: pass@k, response lengths and per-difficulty accuracy on a prompt set."""
    from k15.data.dataset import load_datasets
    from k15.eval_report import run_eval

    cfg = _setup(overrides, print_config)
    if cfg is None:
        return 0
    e = cfg.eval
    _positive(**{"eval.samples": e.samples}, **{f"eval.ks[{i}]": k for i, k in enumerate(e.ks)})
    records = _load_records(e.source, lambda: load_datasets(cfg.data, cfg.seed)[1], e.limit)
    _check_verifiable(records, e.source or "held-out set")
    _warn_default_model(cfg)
    out_dir = Path(e.output or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    run_eval(cfg, records, out_dir, e.source or f"held-out set of data.source={cfg.data.source}")
    ray_stop()
    return 0


def long2short_command(overrides: list[str], print_config: bool = False) -> int:
    """`k15 long2short method=merge|shortest|dpo|rl`: a short-CoT policy from the long one at model.path."""
    from omegaconf import OmegaConf

    from k15.long2short import METHODS, NothingToLearn, held_out_greedy, run_method
    from k15.metrics import console

    cfg = _setup(overrides, print_config)
    if cfg is None:
        return 0
    l2s = cfg.long2short
    if l2s.method not in METHODS:
        raise StartupError(f"pick a method: k15 long2short method={'|'.join(METHODS)} (got {l2s.method})")
    if not cfg.model.path:
        raise StartupError("long2short starts from a long-CoT checkpoint: set model.path=<run_dir>/checkpoint "
                           "(written by k15 train)")
    _check_long2short(cfg)
    out_dir = Path(l2s.output or Path("runs") / time.strftime(f"long2short-{l2s.method}-%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if l2s.method == "rl":  # the training loop, from the long policy, with conf/method/rl.yaml's settings
        OmegaConf.update(cfg, "run_dir", str(out_dir))
        return _run_training(cfg)
    try:
        summary = run_method(cfg, out_dir)
    except (ValueError, NothingToLearn) as e:  # checkpoints that cannot be merged; no correct samples
        ray_stop()
        raise StartupError(str(e)) from None
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in summary.items()]
    if l2s.eval_after:
        for name, path in (("long policy", cfg.model.path), (f"{l2s.method} policy", summary["checkpoint"])):
            e = held_out_greedy(cfg, path)
            rows.append((f"held-out, {name} (greedy)", f"{_pct(e['eval_accuracy'])}, mean length "
                                                        f"{e['eval_mean_length']:.1f}"))
    ray_stop()
    from rich.table import Table

    table = Table(title=f"k15 long2short method={l2s.method}")
    table.add_column("")
    table.add_column("value")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return 0


def _check_long2short(cfg) -> None:
    """Settings a method needs, checked before any model is loaded."""
    l2s = cfg.long2short
    if l2s.method == "merge":
        from k15.long2short.merge import check_compatible

        if not l2s.short_model:
            raise StartupError("method=merge needs long2short.short_model=<short-CoT checkpoint>")
        if len(l2s.merge_weights) != 2:
            raise StartupError(f"long2short.merge_weights needs two weights (model.path, short_model), "
                               f"got {list(l2s.merge_weights)}")
        try:
            check_compatible([Path(cfg.model.path), Path(l2s.short_model)])
        except ValueError as e:
            raise StartupError(str(e)) from None
    elif l2s.method in ("shortest", "dpo"):
        _positive(**{"long2short.samples": l2s.samples, "long2short.steps": l2s.steps,
                     "long2short.batch_size": l2s.batch_size, "long2short.problems": l2s.problems,
                     "long2short.rounds": l2s.rounds})
        if l2s.method == "dpo" and l2s.beta <= 0:
            raise StartupError(f"config: long2short.beta must be > 0, got {l2s.beta}")
        if l2s.method == "dpo" and l2s.longer_factor < 1:
            raise StartupError(f"config: long2short.longer_factor must be >= 1, got {l2s.longer_factor}")


def _check_verifiable(records: list[dict], source: str) -> None:
    """Eval scores every row: a row no verifier can take stops it at start, naming the row."""
    from k15.curate import format_issue

    for i, rec in enumerate(records):
        if rec["task"] != "math":
            why = format_issue(rec)
            if why in ("unknown_task", "bad_code_tests"):
                raise StartupError(f"{source}, problem {i + 1}: {why.replace('_', ' ')} (task '{rec['task']}')")


def curate_command(overrides: list[str], print_config: bool = False) -> int:
    """`k15 curate`: drop unverifiable and easy-to-hack problems, label difficulty, write Parquet."""
    from k15.curate import curate, print_summary
    from k15.data.dataset import load_datasets
    from k15.metrics import console

    cfg = _setup(overrides, print_config)
    if cfg is None:
        return 0
    c = cfg.curate
    _positive(**{"curate.samples": c.samples, "curate.no_cot_max_tokens": c.no_cot_max_tokens})
    if c.no_cot_attempts < 0:
        raise StartupError(f"config: curate.no_cot_attempts must be >= 0, got {c.no_cot_attempts}")
    records = _load_records(c.source, lambda: load_datasets(cfg.data, cfg.seed)[0], c.limit)
    source = Path(c.source or "builtin")
    output = Path(c.output or source.with_name(source.stem + ".curated.parquet"))
    _warn_default_model(cfg)
    summary = curate(cfg, records, output)
    ray_stop()
    print_summary(summary, console)
    return 0


def serve_command(overrides: list[str], print_config: bool = False) -> int:
    """`k15 serve`: Ray Serve's HTTP proxy on serve.host:serve.port, the policy app at /; runs until
    interrupted."""
    import signal

    from omegaconf import OmegaConf

    cfg = _setup(overrides, print_config)
    if cfg is None:
        return 0
    _warn_default_model(cfg)
    s = cfg.serve
    _positive(**{"serve.max_tokens_limit": s.max_tokens_limit, "serve.stream_chunk": s.stream_chunk,
                 "serve.min_replicas": s.min_replicas})
    if s.max_replicas < s.min_replicas:
        raise StartupError(f"config: serve.max_replicas ({s.max_replicas}) < serve.min_replicas ({s.min_replicas})")
    if s.follow and not Path(s.follow).is_dir():
        raise StartupError(f"serve.follow: no such run directory: {s.follow}")
    from ray import serve

    from k15.cluster import init_ray
    from k15.serve.policy import build_app, served_name

    model_cfg = OmegaConf.to_container(cfg.model)
    init_ray(cfg.cluster, cpus_needed=s.min_replicas + 1)
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(model_cfg, s), name="k15-policy", route_prefix="/")
    print(f"k15 serve: http://{s.host}:{s.port}/v1 (model '{served_name(model_cfg, s)}')", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop:
            time.sleep(0.5)
    finally:
        serve.shutdown()
        ray_stop()
    return 0


def ray_stop() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
