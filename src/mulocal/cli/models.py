"""Trained models on the command line: ``eval`` (a checkpoint on a dataset, per replica), ``export`` (replica k as
plain PyTorch, ``export.py``), and train's ``--log KIND:TARGET`` flag (``loggers.py``).
"""
from __future__ import annotations

import argparse
import sys

from ..config import check_device, default_cell, load_data
from ..errors import ConfigError
from ..loggers import SINKS, make_logger, parse_spec
from .paths import out_dir, out_file


# ---------------------------------------------------------------------------- --log
class LogSpec(str):
    """A parsed ``--log`` value: ``kind``, ``target`` and ``output`` (the path it writes, checked and its folder
    made before the work starts by ``paths.prepare_outputs``; None for a remote store)."""

    kind: str
    target: str | None
    output: str | None


def _mlflow_output(uri: str):
    """The local path an MLflow tracking URI writes (a sqlite file, a file store folder), as an output path."""
    if uri.startswith("sqlite:///"):
        return out_file(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        return out_dir(uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):])
    return None if ":" in uri else out_dir(uri)  # a remote server (http://, databricks, ...) or a plain folder


def log_spec(text: str) -> LogSpec:
    """argparse type of ``--log``: the sink's kind known, its local output path checked."""
    try:
        kind, target = parse_spec(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    spec = LogSpec(text)
    spec.kind, spec.target = kind, target
    spec.output = {"tensorboard": out_dir, "jsonl": out_file}.get(kind, lambda t: None)(target)
    if kind == "mlflow" and target:
        spec.output = _mlflow_output(target)
    return spec


def add_log_flag(p) -> None:
    p.add_argument("--log", action="append", type=log_spec, default=[], metavar="KIND[:TARGET]",
                   help=f"also log to ({', '.join(SINKS)}; repeatable): tensorboard:DIR (event files, DIR/replica-K), "
                        "mlflow[:URI] (e.g. sqlite:///mlflow.db; one child run per replica), wandb[:PROJECT], "
                        "jsonl:FILE; the config as hyperparameters, the loss every 32 steps (when the loop reads the "
                        "device anyway), every epoch's metrics (extras: pip install 'mulocal[tensorboard]', "
                        "'[mlflow]', '[wandb]')")


def make_loggers(specs, name: str, subfolder: str | None = None) -> list:
    """The sinks of the parsed ``--log`` flags; ``subfolder`` (several rules in one command) keeps each rule's
    TensorBoard folders apart."""
    out = []
    for s in specs or []:
        target = f"{s.target}/{subfolder}" if subfolder and s.kind == "tensorboard" else s.target
        out.append(make_logger(s.kind, target, run_name=name))
    return out


# ---------------------------------------------------------------------------- eval
def cmd_eval(args) -> dict:
    from ..export import evaluate_checkpoint, load_net
    if args.test_subset is not None and args.test_subset < 1:
        raise ConfigError(f"--test-subset must be positive, got {args.test_subset}")
    net, ck = load_net(args.checkpoint, check_device(args.device))
    cell = dict(ck.get("cell") or {})
    dataset = args.dataset or cell.get("dataset")
    if not dataset:
        raise ConfigError(f"the checkpoint {args.checkpoint} does not say its dataset (written before mulocal kept "
                          "it): give --dataset")
    same = dataset == cell.get("dataset")
    data_cell = default_cell(dataset=dataset, **{k: cell[k] for k in ("train_subset", "test_subset", "data_seed")
                                                 if same and k in cell})
    if args.test_subset is not None:
        data_cell["test_subset"] = args.test_subset
    data = load_data(data_cell, args.data_dir, download=not args.no_download, cache=False)
    reps = evaluate_checkpoint(net, ck, data, cell.get("loss", "ce"), args.batch_size)
    if not args.json:
        for r in reps:
            lr = "" if r["lr"] is None else f" lr {r['lr']:g}"
            print(f"replica {r['replica']} (seed {r['seed']}{lr}, {r['status']}): test loss {r['test_loss']:.4f}, "
                  f"test accuracy {r['test_accuracy']:.4f}")
    return {"checkpoint": str(args.checkpoint), "dataset": dataset, "test_samples": len(data.x_test),
            "epoch": ck.get("epoch"), "net": ck["net"], "replicas": reps}


# ---------------------------------------------------------------------------- export
def cmd_export(args) -> dict:
    from ..export import check_replica, export, load_net, module_source
    net, ck = load_net(args.checkpoint)
    k = check_replica(ck, args.replica)
    module = export(net, k, args.out, args.format)
    dtype = str(net.dtype).replace("torch.", "")
    out = {"checkpoint": str(args.checkpoint), "replica": k, "out": str(args.out), "format": args.format,
           "dtype": dtype, "input_shape": list(net.input_shape), "module": repr(module)}
    if args.format == "state-dict":
        out["source"] = module_source(module)
        how = (f"{out['source']}model.load_state_dict(torch.load({str(args.out)!r}, weights_only=True))\n"
               f"logits = model(x)  # x: (B, {', '.join(map(str, net.input_shape))}), {dtype}")
    else:
        how = (f"import torch\nmodel = torch.export.load({str(args.out)!r}).module()\n"
               f"logits = model(x)  # x: (B, {', '.join(map(str, net.input_shape))}), {dtype}")
    if not args.json:
        print(f"wrote replica {k} of {args.checkpoint} to {args.out} ({args.format}); load it without mulocal:",
              file=sys.stderr)
        print(how)
    return out


# ---------------------------------------------------------------------------- parsers
def add_eval(p) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train --checkpoint")
    p.add_argument("--dataset", default=None, help="evaluate on this dataset's test set (default: the checkpoint's)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    p.add_argument("--no-download", action="store_true", help="never try to download the data")
    p.add_argument("--test-subset", type=int, default=None,
                   help="use only this many test samples (default: the checkpoint's run's)")
    p.add_argument("--batch-size", type=int, default=2000, help="samples per evaluation batch (default 2000)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def add_export(p) -> None:
    from ..util import EXPORT_FORMATS as FORMATS  # (no torch: the parser builds without it)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train --checkpoint")
    p.add_argument("--replica", type=int, default=0, help="which replica (default 0)")
    p.add_argument("--out", type=out_file, required=True, help="the file to write")
    p.add_argument("--format", choices=FORMATS, default="state-dict",
                   help="state-dict: the state dict of a torch.nn.Sequential (the source that builds it is printed); "
                        "program: a torch.export program, loaded by torch.export.load(OUT).module() (default "
                        "state-dict)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export)


__all__ = ["LogSpec", "add_eval", "add_export", "add_log_flag", "cmd_eval", "cmd_export", "log_spec", "make_loggers"]
