"""Command line: `plan-and-run [CONFIG]` and `muxtune <command>`.

Exit codes: 0 success; 2 bad input (config, data, plan, model, devices), with a message naming the
file, line or key and no traceback; 130 interrupted. Anything else is a bug in MuxTune (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from muxtune import allocator
from muxtune.errors import MuxTuneError

DEFAULT_CONFIG = Path("examples/quickstart.yaml")
# commands that load a backbone: started again on tcmalloc where installed, so that their memory is what the
# CostModel and admission price (muxtune/allocator.py); their children (profiles, processes) inherit it
MEASURES_OR_TRAINS = ("run", "profile", "plan", "simulate")


def _guard(fn, args) -> int:
    try:
        return fn(args) or 0
    except MuxTuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no outputs were written (the run folder keeps its last checkpoint: "
              "continue with --resume)", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _about(config_path: str):
    """Errors found after the config parsed (model, devices, targets) still name the config file."""
    try:
        yield
    except MuxTuneError as exc:
        message = str(exc)
        if not message.startswith(("/", ".")) and ".jsonl" not in message.split(":")[0]:
            raise MuxTuneError(f"{config_path}: {message}") from None
        raise


def _out_dir(config, args) -> Path:
    return Path(args.out) if args.out else Path("runs") / config.name


def _print_run(metrics: dict) -> None:
    from muxtune.report import summary_table

    print(summary_table(metrics).to_string(index=False))
    print(f"{metrics['tokens']} tokens in {metrics['train_time_s']:.1f} s "
          f"({metrics['tokens_per_s']:.0f} tokens/s, {100 * metrics['ineffective_token_fraction']:.1f}% padding)")
    stopped = {name: t for name, t in metrics["tasks"].items() if t["status"] in ("failed", "cancelled")}
    for name, t in stopped.items():
        print(f"{name}: {t['status']}: {t['reason']}")


def _print_prediction(prediction) -> None:
    info = prediction.info
    print(f"plan vs baselines for {info['model']} on {info['gpus']} device(s), predicted with the "
          f"{info['cost_model']} cost model (tokens_per_s: useful tokens of every task's steps / makespan_s):")
    print(prediction.comparison.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(prediction.plans["muxtune"].explanation)
    print(f"verdict: {prediction.info['why']}")


def cmd_run(args) -> int:
    from muxtune.run import execute
    from muxtune.spec import Plan, load_config

    config = load_config(args.config)
    plan = Plan.load(args.plan) if getattr(args, "plan", None) else None
    out = _out_dir(config, args)
    with _about(args.config):
        metrics = execute(config, out, plan=plan, progress=not args.no_progress, resume=args.resume)
    _print_run(metrics)
    print(f"wrote {out}/ (plan.json, metrics.json, report.html, adapters/, checkpoints/)")
    return 0


def cmd_plan_and_run(args) -> int:
    from muxtune.run import plan_and_run
    from muxtune.spec import Plan, load_config

    config = load_config(args.config)
    plan = Plan.load(args.plan) if args.plan else None
    out = _out_dir(config, args)
    dry_run = getattr(args, "dry_run", True)
    with _about(args.config):
        prediction, metrics = plan_and_run(config, out, plan=plan, profile=args.profile, dry_run=dry_run,
                                           hardware=args.hardware, gpus=args.gpus,
                                           progress=not args.no_progress, resume=getattr(args, "resume", False))
    _print_prediction(prediction)
    if metrics is not None:
        _print_run(metrics)
    print(f"report: {(out / 'report.html').resolve()}")
    return 0


def cmd_report(args) -> int:
    from muxtune.report import write_report

    path = write_report(Path(args.run_dir))
    print(f"report: {path.resolve()}")
    return 0


def cmd_submit(args) -> int:
    from muxtune.spool import submit

    path = submit(Path(args.run_dir), Path(args.task_file))
    print(f"queued {path}; the run takes it at its next step boundary (a rejection lands beside it as .rejected)")
    return 0


def cmd_cancel(args) -> int:
    from muxtune.spool import cancel

    path = cancel(Path(args.run_dir), args.task)
    print(f"queued {path}; the run stops {args.task} at its next step boundary")
    return 0


def cmd_validate(args) -> int:
    from muxtune.executor.data import DataOptions, FileReport
    from muxtune.run import prepare
    from muxtune.spec import load_config

    config = load_config(args.config)
    with _about(args.config):
        _, plan, examples, stats = prepare(config)
    for task in config.tasks:
        s = stats[task.name]
        print(f"{task.name}: {task.peft.method}, {len(examples[task.name])} {s.format} examples "
              f"({s.truncated} truncated, {s.dropped_too_long + s.dropped_no_target} dropped, "
              f"{s.skipped_bad_lines} bad lines skipped) from {task.data}")
        print(FileReport.of(task.data, s, task.max_seq_len, DataOptions.of(task)).text())
    print(f"ok: {len(config.tasks)} tasks; plan: {plan.explanation}")
    return 0


def cmd_profile(args) -> int:
    import re

    import torch

    from muxtune.profiler.profile import load_or_profile
    from muxtune.run import DTYPES

    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.devices):
        raise MuxTuneError(f"--devices: expected 'cpu', 'cuda' or 'cuda:N', got {args.devices!r}")
    device = "cuda:0" if args.devices == "cuda" else args.devices
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    sizes = []
    for item in (args.sizes or "").split(","):
        if item.strip():
            parts = item.strip().lower().split("x")
            if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
                raise MuxTuneError(f"--sizes: expected TOKENSxSEQ_LEN items such as 9216x512, got {item.strip()!r}")
            sizes.append((int(parts[0]), int(parts[1])))
    if args.budget is not None and args.budget < 0:
        raise MuxTuneError(f"--budget: expected seconds >= 0 (0: no budget), got {args.budget}")
    budget = -1.0 if args.budget is None else (args.budget or None)
    profile, path, reused = load_or_profile(args.model, device, args.mode, DTYPES[args.dtype],
                                            out=args.out, refresh=args.refresh, progress=not args.no_progress,
                                            budget=budget, methods=methods, targets=targets, sizes=sizes)
    fp = profile.meta["fingerprint"]
    if reused:
        how = "reused stored profile"
    else:
        meta = profile.meta
        how = (f"measured {len(profile.table)} rows ({args.mode}) in {meta['seconds']:.0f} s"
               + (f" (budget {meta['budget_s']:.0f} s)" if meta.get("budget_s") else "")
               + (f"; cut to fit: {'; '.join(meta['cuts'])}" if meta.get("cuts") else ""))
    print(f"{how} for {fp['model']} on {fp['device_name']} (threads {fp['threads']}, torch {fp['torch']})")
    print(f"wrote {path}" if not reused else f"profile: {path}")
    return 0


def cmd_plan(args) -> int:
    from muxtune.planner.plan import plan
    from muxtune.planning import planning_inputs
    from muxtune.spec import load_config

    config = load_config(args.config)
    with _about(args.config):
        cluster, cost_model, params = planning_inputs(config, hardware=args.hardware, gpus=args.gpus,
                                                      memory_gib=args.memory_gib, profile=args.profile)
        result = plan(config.tasks, cluster, cost_model, objective=args.objective, time_limit=args.time_limit,
                      params=params)
    out = Path(args.out) if args.out else Path("runs") / config.name / "plan.json"
    result.plan.save(out)
    print(f"cost model: {cost_model.device}")
    print(result.table.to_string(index=False, float_format=lambda v: f"{v:,.3g}"))
    print(result.plan.explanation)
    print(f"planned in {result.solve_seconds:.1f} s (baselines compared in {result.compare_seconds:.1f} s); "
          f"wrote {out}")
    return 0


EXIT_CODES = ("exit codes: 0 ok; 2 bad input (the message names the file, line or key; no traceback); "
              "130 interrupted; anything else is a bug in MuxTune")
HARDWARE = "a100-40gb, a100-80gb, h100, h200, a40, l4 (profiler/hardware.csv)"


def _add_run_args(p: argparse.ArgumentParser, optional_config: bool, plans: bool = True) -> None:
    if optional_config:
        p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                       help=f"run config YAML (default: {DEFAULT_CONFIG})")
    else:
        p.add_argument("config", help="run config YAML")
    p.add_argument("--out", help="output folder (default: runs/<name>/)")
    p.add_argument("--plan", help="a plan.json (from `muxtune plan` or a run folder) to carry out "
                   + ("instead of planning" if plans else "instead of the trivial plan (every task fused on one device)"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished tasks from the output folder's checkpoints/")


def _add_predict_args(p: argparse.ArgumentParser, dry_run_only: bool) -> None:
    p.add_argument("--profile", help="profile CSV to price ops with (default: a cached profile of this "
                                     "device, else a quick one measured now, ~minutes on a CPU)")
    p.add_argument("--hardware", help=f"plan for catalog GPUs that are not here, priced by the analytic cost "
                                      f"model: {HARDWARE}" + ("" if dry_run_only else "; needs --dry-run"))
    p.add_argument("--gpus", type=int, default=1, help="how many --hardware GPUs to plan for (default 1)")


def plan_and_run_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plan-and-run",
        description="The whole chain for CONFIG: profile (reuse a cached one) -> plan (OR-Tools planner, and "
                    "the dedicated / spatial / temporal baselines) -> simulate -> train every task multiplexed "
                    "on one shared backbone -> report. Writes runs/<name>/: plan.json, plans.csv (plan vs "
                    "baselines, predicted), simulation.csv (timeline of a step, and of a step with evaluations "
                    "where tasks validate), memory.csv, metrics.json, report.html + PNGs, adapters/ (HF PEFT "
                    "format).",
        epilog="examples: plan-and-run (the quickstart); plan-and-run CONFIG --out DIR; "
               "plan-and-run CONFIG --dry-run --hardware h100 --gpus 16 (plan + simulate for 16 H100s, no "
               "training). " + EXIT_CODES,
    )
    _add_run_args(parser, optional_config=True)
    _add_predict_args(parser, dry_run_only=False)
    parser.add_argument("--dry-run", action="store_true", help="plan + simulate + report only: no training")
    args = parser.parse_args(argv)
    if argv is None:  # a command line, not a call: train on tcmalloc where installed (muxtune/allocator.py)
        allocator.reexec()
    return _guard(cmd_plan_and_run, args)


def cmd_serve(args) -> int:
    import json

    import uvicorn

    from muxtune.service.api import create_app
    from muxtune.service.config import load_service_config
    from muxtune.service.store import Store
    from muxtune.spec import write_text_atomic

    allocator.library()  # a wrong MUXTUNE_MALLOC is named before the server starts, not in its supervisor
    config = load_service_config(args.config)
    store = Store(args.state).init()
    # the workers read the same settings from the state folder
    write_text_atomic(store.root / "service.json", json.dumps(config.model_dump(mode="json")) + "\n")
    print(f"serving {', '.join(config.models)} on http://{args.host}:{args.port}/v1 (state: {store.root})",
          file=sys.stderr, flush=True)
    uvicorn.run(create_app(store, config), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_keys(args) -> int:
    from muxtune.service.store import Store

    store = Store(args.state).init()
    if args.action == "list":
        for key in store.list_keys(args.org):
            print(f"{key['id']}  org={key['org']}  created_at={key['created_at']}"
                  + ("  admin" if key["admin"] else "")
                  + (f"  revoked_at={key['revoked_at']}" if key["revoked_at"] else ""))
        return 0
    if args.admin and args.action == "create":
        args.org = args.org or "operator"
    if not args.org:
        raise MuxTuneError(f"keys {args.action}: --org is required")
    if args.action == "create":
        key_id, key = store.create_key(args.org, admin=args.admin)
        print(key)
        what = "an operator key (GET /admin)" if args.admin else f"a key for organisation {args.org!r}"
        print(f"{key_id}: {what}; it is shown only now", file=sys.stderr)
        return 0
    if not args.key_id:
        raise MuxTuneError("keys revoke: name the key id (see `muxtune keys list`)")
    store.revoke_key(args.key_id, args.org)
    print(f"revoked {args.key_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muxtune", description="MuxTune: many PEFT jobs, one backbone. "
                                     "`muxtune COMMAND --help` describes each command; `plan-and-run` runs "
                                     "the whole chain.", epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, summary, example=""):
        p = sub.add_parser(name, help=summary, description=summary,
                           epilog=(f"example: {example}. " if example else "") + EXIT_CODES)
        p.set_defaults(fn=fn)
        return p

    p = command("run", cmd_run, "train a config's tasks multiplexed on one backbone, on the trivial plan or "
                "--plan (no planning; plan-and-run runs the whole chain)", "muxtune run CONFIG --plan plan.json")
    _add_run_args(p, optional_config=False, plans=False)
    p = command("validate", cmd_validate, "check a config and its data files without training: per task "
                "file, its kind and format, examples, trainable tokens, what was dropped and why, lengths vs "
                "max_seq_len", "muxtune validate examples/quickstart.yaml")
    p.add_argument("config", help="run config YAML")
    p = command("submit", cmd_submit, "add a task to a running job: it joins at the next step boundary, "
                "without reloading the backbone", "muxtune submit runs/quickstart new_task.yaml")
    p.add_argument("run_dir", help="the running job's output folder (runs/<name>/)")
    p.add_argument("task_file", help="a YAML file of one task's keys (as an entry of a config's tasks:)")
    p = command("cancel", cmd_cancel, "stop a task of a running job at its next step boundary (the others "
                "go on)", "muxtune cancel runs/quickstart chat")
    p.add_argument("run_dir", help="the running job's output folder (runs/<name>/)")
    p.add_argument("task", help="the task's name")
    p = command("profile", cmd_profile, "measure op costs on this device -> a profile CSV (cached by device "
                "fingerprint), which prices plans", "muxtune profile --model builtin:tiny-llama --devices cpu")
    p.add_argument("--model", default="builtin:tiny-llama", help="builtin:<preset> or a local HF model dir "
                   "(default builtin:tiny-llama)")
    p.add_argument("--devices", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--mode", choices=["quick", "full"], default="quick", help="quick (default): the grid "
                   "plans are priced with; full: more points, ranks and sizes to start from")
    p.add_argument("--budget", type=float, help="seconds the profile may take (default: 180 quick, 600 full; "
                   "0: no budget): repeats stop once each median is known within 2%%, and a grid that does "
                   "not fit is thinned (docs/profiler.md)")
    p.add_argument("--methods", help="comma-separated PEFT methods to measure (default: all seven)")
    p.add_argument("--targets", help="comma-separated op names whose LoRA/DoRA rows are measured (default: "
                   "every op of a layer)")
    p.add_argument("--sizes", help="comma-separated TOKENSxSEQ_LEN of the steps the tasks at hand run (e.g. "
                   "9216x512): the layer rows reach them")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="backbone dtype, as the config's dtype (default float32)")
    p.add_argument("--threads", type=int, help="CPU threads to measure with (part of the fingerprint)")
    p.add_argument("--out", help="profile CSV to write (default: the user cache, ~/.cache/muxtune/profiles)")
    p.add_argument("--refresh", action="store_true", help="measure even if a cached profile matches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = command("plan", cmd_plan, "choose fusion groups and parallel layouts for a config's tasks (OR-Tools "
                "CP-SAT over the CostModel) -> plan.json, compared with the dedicated / spatial / temporal "
                "baselines", "muxtune plan examples/mixed_methods.yaml --hardware h100 --gpus 16")
    p.add_argument("config", help="run config YAML (its optional cluster: section describes the devices)")
    p.add_argument("--hardware", help=f"plan for GPUs that are not here, priced by the analytic cost model: {HARDWARE}")
    p.add_argument("--gpus", type=int, help="devices in the cluster (default: the config's cluster, else 1)")
    p.add_argument("--memory-gib", type=float, help="memory per device (default: the cluster's, the catalog's, "
                   "or what this machine has free)")
    p.add_argument("--profile", help="a profile CSV to price this machine with (default: the cached profile of "
                   "this device, measured now if there is none)")
    p.add_argument("--objective", choices=["throughput", "steady"], default="throughput",
                   help="throughput (default): useful tokens of the whole job (every task's steps) per second "
                   "of its makespan, i.e. finish the job soonest; steady: tokens/s while every task is present "
                   "(as if finished tenants were always replaced)")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds for the search (default 10)")
    p.add_argument("--out", help="plan JSON to write (default: runs/<name>/plan.json)")
    p = command("simulate", cmd_plan_and_run, "plan + simulate the whole job (no training): plan vs "
                "baselines, timeline, memory, report.html; the same as plan-and-run --dry-run",
                "muxtune simulate examples/quickstart.yaml --hardware h100 --gpus 16")
    p.add_argument("config", help="run config YAML")
    p.add_argument("--plan", help="a plan.json to simulate instead of planning")
    p.add_argument("--out", help="output folder (default: runs/<name>/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_predict_args(p, dry_run_only=True)
    p = command("serve", cmd_serve, "run the fine-tuning service: the OpenAI fine-tuning API under /v1, jobs "
                "trained multiplexed on one backbone per base model (docs/service.md)",
                "muxtune serve --state /var/lib/muxtune --port 8000")
    p.add_argument("--state", required=True, help="the folder everything is kept in (database, files, adapters)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--config", help="SERVICE.yaml: models, device, memory limit, per-organisation limits")
    p = command("keys", cmd_keys, "API keys of the service: create (printed once, only its hash is kept), "
                "list, revoke", "muxtune keys create --state /var/lib/muxtune --org acme")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("key_id", nargs="?", help="revoke: the key's id (as `keys list` shows it)")
    p.add_argument("--state", required=True, help="the service's state folder")
    p.add_argument("--org", help="the organisation (required for create and revoke; an --admin key's "
                   "defaults to 'operator')")
    p.add_argument("--admin", action="store_true", help="create: an operator's key, for the /admin page (every "
                   "organisation's jobs); the /v1 API refuses it")
    p = command("report", cmd_report, "re-render RUN_DIR/report.html and its PNGs from the run folder's files",
                "muxtune report runs/quickstart")
    p.add_argument("run_dir", help="a run folder (runs/<name>/) with plan.json")
    args = parser.parse_args(argv)
    if argv is None and args.command in MEASURES_OR_TRAINS:
        allocator.reexec()
    return _guard(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
