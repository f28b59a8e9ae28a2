"""Command-line shells over the library: ``retrain`` (train, serve, export) and ``label_image``.

Every command's parser lives here (``training_parser``, ``serve_parser``, ``export_parser``,
``label_image_parser``); each command parses flags and calls one public function; no logic lives here.
Flag names are retrain.py's and label_image.py's; ``--image-dir`` works as well as
``--image_dir``; an unknown flag is an error that suggests the nearest valid one.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from retrain.config import TrainConfig
from retrain.errors import RetrainError

log = logging.getLogger("retrain")


EXIT_CODES = """exit codes: 0 success; 1 internal error (a bug: please report it); 2 bad input, usage or
environment (message says what to fix: unreadable folder, unwritable output, full disk...); 3 some files could not be
used (--strict, or label_image images that could not be read); 130 interrupted; 141 output pipe closed (e.g. | head)."""

# OSErrors that describe the machine, not a bug: reported as one line with exit code 2.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class _Parser(argparse.ArgumentParser):
    """argparse without prefix guessing, with "did you mean" for unknown flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        ns, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flags = [s for a in self._actions for s in a.option_strings]
            bad = unknown[0].split("=", 1)[0]
            close = difflib.get_close_matches(bad, flags, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; see {self.prog} --help"
            self.error(f"unrecognized argument {unknown[0]!r}{hint}")
        return ns


def _add(parser, name: str, **kwargs) -> argparse.Action:
    """Add ``--name`` with its dashed twin ``--na-me``."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    return parser.add_argument(*flags, dest=name, **kwargs)


def training_parser() -> _Parser:
    from retrain.backbones import available_backbones

    d = TrainConfig()
    p = _Parser(
        prog="retrain",
        description="Retrain an image classifier for new categories. Point --image_dir at a folder with one "
        "sub-folder of images per class. Also: `retrain serve --graph MODEL`, `retrain export --graph MODEL "
        "--to FORMAT`, `retrain extract --image_dir DIR`, `retrain report RUN_DIR` and `retrain relabel "
        "label_issues.csv` (see their --help).",
        epilog=EXIT_CODES,
    )
    g = p.add_argument_group("data")
    _add(
        g,
        "image_dir",
        default=d.image_dir,
        help="folder of class sub-folders (default: bundled sample photos)",
    )
    _add(
        g,
        "testing_percentage",
        type=float,
        default=d.testing_percentage,
        help="percent of images used as test set",
    )
    _add(
        g,
        "validation_percentage",
        type=float,
        default=d.validation_percentage,
        help="percent used as validation set",
    )
    g = p.add_argument_group("several labels per photo (docs/multilabel.md)")
    _add(
        g,
        "multi_label",
        action="store_true",
        help="one independent probability per label: a photo in several class folders (copied or linked) "
        "carries all of those labels",
    )
    _add(
        g,
        "labels_file",
        default=d.labels_file,
        help="labels from a file instead of folders (implies --multi_label): CSV with columns path,labels "
        "(labels separated by ';') or JSON lines; paths relative to --image_dir",
    )
    _add(
        g,
        "multi_label_threshold",
        type=float,
        default=d.multi_label_threshold,
        help="one decision threshold for every label (default: one per label, tuned on held-out images)",
    )
    g = p.add_argument_group("backbone")
    _add(
        g,
        "architecture",
        default=d.architecture,
        help=f"pretrained backbone: {', '.join(available_backbones())}",
    )
    _add(
        g,
        "tfhub_module",
        default=d.tfhub_module,
        help="retrain.py's way to pick a backbone; give a name as for "
        "--architecture (TF Hub URLs cannot be loaded)",
    )
    _add(
        g,
        "model_dir",
        default=d.model_dir,
        help="where the exported backbone is cached (default ~/.cache/retrain/models)",
    )
    _add(
        g,
        "bottleneck_dir",
        default=d.bottleneck_dir,
        help="bottleneck cache folder, safe to share between runs (default ~/.cache/retrain/bottlenecks)",
    )
    _add(g, "device", default=d.device, choices=["auto", "cpu", "cuda"], help="where the network runs")
    _add(
        g,
        "batch_size",
        type=int,
        default=d.batch_size,
        help="images per forward pass when computing bottlenecks (0 = automatic: 8 per CPU core, 64 on a GPU, "
        "32 for distortions and fine-tuning)",
    )
    _add(g, "num_workers", type=int, default=d.num_workers, help="image decoding threads (0 = automatic)")
    _add(
        g,
        "engine",
        default=d.engine,
        choices=["local", "ray"],
        help="where bottlenecks are computed: this "
        "machine, or a Ray cluster (pip install 'retrain[ray]'; docs/scale.md)",
    )
    _add(
        g,
        "ray_address",
        default=d.ray_address,
        help="with --engine ray: auto, HOST:PORT or ray://HOST:PORT (default: Ray on this machine)",
    )
    _add(
        g,
        "extraction_precision",
        default=d.extraction_precision,
        choices=["float32", "int8"],
        help="int8: a quantized backbone for extraction, faster on CPUs with VNNI (docs/scale.md)",
    )
    g = p.add_argument_group("training the new layer")
    _add(g, "how_many_training_steps", type=int, default=d.how_many_training_steps, help="training steps")
    _add(g, "learning_rate", type=float, default=d.learning_rate, help="learning rate of the new layer")
    _add(
        g,
        "optimizer",
        default=d.optimizer,
        choices=["adam", "sgd", "momentum"],
        help="update rule (retrain.py used plain sgd)",
    )
    _add(
        g,
        "weight_decay",
        type=float,
        default=d.weight_decay,
        help="L2 penalty on the new layer's weights (default: chosen by the cross-fit with --head_solver "
        "lbfgs; 0 with --head_solver steps)",
    )
    _add(g, "train_batch_size", type=int, default=d.train_batch_size, help="images per training step")
    _add(g, "eval_step_interval", type=int, default=d.eval_step_interval, help="report every N steps")
    _add(
        g,
        "validation_batch_size",
        type=int,
        default=d.validation_batch_size,
        help="validation images per report (-1 = all)",
    )
    _add(
        g,
        "test_batch_size",
        type=int,
        default=d.test_batch_size,
        help="test images for the final score (-1 = all)",
    )
    _add(
        g,
        "class_balance",
        default=d.class_balance,
        choices=["sample", "weight", "none"],
        help="sample: draw classes uniformly (retrain.py); weight: weight the loss by inverse class frequency; "
        "none: draw images uniformly. The lbfgs solver counts every image once unless this is weight",
    )
    _add(
        g,
        "head_solver",
        default=d.head_solver,
        choices=["lbfgs", "steps"],
        help="with --final_fit train+val or all: lbfgs (default) solves an L2-regularised logistic regression, "
        "its strength chosen by the cross-fit; steps trains --how_many_training_steps at most, the number "
        "chosen by the cross-fit",
    )
    _add(
        g,
        "final_fit",
        default=d.final_fit,
        choices=["train", "train+val", "all"],
        help="images the exported layer is fitted on: all (default: training + validation, then the test images "
        "folded in after the test accuracy is printed), train+val (the test images never reach it; both "
        "choose the layer's settings by 5-fold cross-fitting), or train (retrain.py: best step on the "
        "validation split)",
    )
    _add(
        g,
        "seed",
        type=int,
        default=d.seed,
        help="random seed; the same seed gives the same model bit for bit "
        "(default: random, printed in metrics.json)",
    )
    _add(
        g,
        "calibration",
        default=d.calibration,
        choices=["temperature", "none"],
        help="fit a temperature on held-out predictions so that the probabilities are calibrated (the predicted "
        "class never changes); none keeps the raw softmax",
    )
    _add(
        g,
        "unknown_threshold",
        type=float,
        default=d.unknown_threshold,
        help="unknown_score above which an image is called unknown (default: chosen so that 95%% of known "
        "out-of-fold images are accepted)",
    )
    _add(
        g,
        "resume",
        action="store_true",
        help="continue an interrupted run from its checkpoint; without "
        "--output_dir or --checkpoint_path, the last interrupted run under retrain_runs/",
    )
    g = p.add_argument_group("distortions (training images only)")
    _add(g, "flip_left_right", action="store_true", help="randomly mirror images horizontally")
    _add(g, "random_crop", type=float, default=d.random_crop, help="percent margin to randomly crop off")
    _add(g, "random_scale", type=float, default=d.random_scale, help="percent to randomly scale up")
    _add(
        g,
        "random_brightness",
        type=float,
        default=d.random_brightness,
        help="percent to randomly vary brightness",
    )
    _add(
        g,
        "distorted_copies",
        type=int,
        default=d.distorted_copies,
        help="distorted variants cached per training image (0 = automatic)",
    )
    g = p.add_argument_group("fine-tuning")
    _add(g, "fine_tune", action="store_true", help="after the new layer, also train the top of the backbone")
    _add(
        g,
        "fine_tune_blocks",
        default=d.fine_tune_blocks,
        help="backbone blocks to unfreeze from the top, or "
        "'all'; for photos far from ImageNet more blocks help (see docs/finetune.md)",
    )
    _add(g, "fine_tune_epochs", type=int, default=d.fine_tune_epochs, help="maximum fine-tuning epochs")
    _add(
        g,
        "fine_tune_learning_rate",
        type=float,
        default=d.fine_tune_learning_rate,
        help="backbone learning rate",
    )
    _add(
        g,
        "fine_tune_patience",
        type=int,
        default=d.fine_tune_patience,
        help="stop after this many epochs without validation improvement",
    )
    _add(
        g,
        "quality",
        default=d.quality,
        choices=("default", "best"),
        help="'best': choose the backbone (EfficientNet-Lite0, MobileNet V2, EfficientNet-Lite2) by cross-fit "
        "accuracy on training+validation, then fine-tune with the measured recipe and keep it only if it beats "
        "the frozen model on validation (minutes to an hour on a CPU; the time estimate is printed first); "
        "--architecture and fine_tune_* flags you give still apply",
    )
    g = p.add_argument_group("outputs")
    _add(
        g,
        "output_dir",
        default=d.output_dir,
        help="folder for this run's outputs (default ./retrain_runs/<time>)",
    )
    _add(
        g,
        "output_graph",
        default=d.output_graph,
        help="model file to write (ONNX; default <output_dir>/output_graph.onnx)",
    )
    _add(
        g,
        "output_labels",
        default=d.output_labels,
        help="labels file (default <output_dir>/output_labels.txt)",
    )
    _add(
        g, "summaries_dir", default=d.summaries_dir, help="TensorBoard logs (default <output_dir>/summaries)"
    )
    _add(
        g,
        "checkpoint_path",
        default=d.checkpoint_path,
        help="training checkpoint (default <output_dir>/checkpoint.npz)",
    )
    _add(
        g,
        "intermediate_output_graphs_dir",
        default=d.intermediate_output_graphs_dir,
        help="where intermediate models go (default <output_dir>/intermediate)",
    )
    _add(
        g,
        "intermediate_store_frequency",
        type=int,
        default=d.intermediate_store_frequency,
        help="save an intermediate model every N steps (0 = never)",
    )
    _add(
        g,
        "saved_model_dir",
        default=d.saved_model_dir,
        help="also write a serving folder (model, labels, manifest)",
    )
    _add(g, "final_tensor_name", default=d.final_tensor_name, help="name of the model's output")
    _add(g, "quantize", default=d.quantize, choices=["", "int8", "fp16"], help="also write a quantized model")
    _add(g, "print_misclassified_test_images", action="store_true", help="list misclassified test images")
    _add(
        g,
        "no_report",
        action="store_true",
        help="skip the audit (label_issues.csv, duplicates.csv, learning_curve.csv) and report.html",
    )
    g = p.add_argument_group("messages")
    _add(g, "strict", action="store_true", help="fail if any file cannot be used, instead of skipping it")
    _add(g, "quiet", action="store_true", help="no progress bar")
    _add(
        g,
        "logging_verbosity",
        default=d.logging_verbosity,
        choices=["DEBUG", "INFO", "WARN", "ERROR", "FATAL"],
        help="how much to print",
    )
    return p


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname}: {msg}"


class _StdoutHandler(logging.StreamHandler):
    """A closed pipe (``retrain ... | head``) silences the log instead of printing a traceback per line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            _silence_stdout()
            return
        super().handleError(record)


def _silence_stdout() -> None:
    """Send further output to /dev/null, so the final flush at exit cannot fail either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (e.g. captured output): nothing to protect
        pass


def _safe_streams() -> None:
    """Never fail on printing a name the terminal's encoding cannot show: escape it instead."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # replaced by something that is not a TextIOWrapper
            pass


def setup_logging(level: str = "INFO") -> None:
    """Plain lines on stdout for the retrain logger (used by the command-line tools only)."""
    _safe_streams()
    handler = _StdoutHandler(sys.stdout)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel({"WARN": "WARNING", "FATAL": "CRITICAL"}.get(level, level))


def _run(fn, *args) -> int:
    """Run a command: user errors become one clear line and an exit code, never a traceback."""
    try:
        result = fn(*args)
        return int(result or 0)
    except RetrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "interrupted; finished cache entries are kept, run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except Exception as exc:  # noqa: BLE001 - last line of defence
        if os.environ.get("RETRAIN_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:  # full disk, read-only, ...
            where = (
                f" ({os.fsencode(exc.filename).decode('utf-8', 'backslashreplace')})" if exc.filename else ""
            )
            print(
                f"error: {exc.strerror or exc}{where}. Free some space, fix the permissions or choose another "
                "location; finished cache entries are kept, so running the same command again resumes.",
                file=sys.stderr,
            )
            return 2
        print(
            f"internal error: {type(exc).__name__}: {exc}\n(set RETRAIN_DEBUG=1 to see the traceback, "
            "and please report it)",
            file=sys.stderr,
        )
        return 1


def retrain_main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    ns = training_parser().parse_args(argv)
    setup_logging(ns.logging_verbosity)
    config = TrainConfig(**{k: v for k, v in vars(ns).items() if k in TrainConfig.field_names()})

    def go() -> int:
        from retrain.train import train

        result = train(config=config)
        if result.skipped:  # repeated at the end, where a user looks after a long run
            log.warning(
                "%d file(s) could not be used and were skipped (listed above; --strict makes that an error).",
                len(result.skipped),
            )
        log.info("Done. Classify images with: label_image --graph %s --image PATH", result.output_graph)
        return 0

    return _run(go)


# -- label_image --------------------------------------------------------------------------------
def label_image_parser() -> _Parser:
    p = _Parser(
        prog="label_image",
        description="Classify images with a model written by retrain. Preprocessing, input size and labels are "
        "read from the model; the tutorial's layer/mean/std flags are accepted and checked against it.",
        epilog=EXIT_CODES,
    )
    _add(
        p,
        "graph",
        default="",
        help="model file (default: the latest run's retrain_runs/latest/output_graph.onnx)",
    )
    _add(p, "labels", default="", help="labels file; checked against the labels stored in the model")
    _add(p, "image", nargs="+", default=[], help="image files or folders (searched recursively)")
    _add(p, "json", action="store_true", help="one JSON object per image per line")
    _add(p, "top_k", type=int, default=5, help="how many labels to print per image")
    _add(p, "num_top_predictions", type=int, default=None, help="same as --top_k (old label_image name)")
    _add(p, "num_threads", type=int, default=0, help="inference threads (0 = automatic)")
    _add(
        p,
        "unknown_threshold",
        type=float,
        default=None,
        help="call an image unknown above this unknown_score (default: the threshold stored in the model)",
    )
    _add(p, "input_layer", default=None, help="accepted for compatibility; the model knows its input")
    _add(p, "output_layer", default=None, help="accepted for compatibility; the model knows its output")
    _add(p, "input_height", type=int, default=None, help="accepted; the model's input size is used")
    _add(p, "input_width", type=int, default=None, help="accepted; the model's input size is used")
    _add(p, "input_mean", type=float, default=None, help="accepted; the model's normalisation is used")
    _add(p, "input_std", type=float, default=None, help="accepted; the model's normalisation is used")
    return p


def label_image_main(argv: Sequence[str] | None = None) -> int:
    _safe_streams()
    ns = label_image_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return _run(classify_command, ns)


def classify_command(ns: argparse.Namespace) -> int:
    from retrain.predict import check_legacy_flags, expand_image_paths, load, read_labels_file

    graph = ns.graph or _latest_graph()
    clf = load(graph, threads=ns.num_threads or None)
    for note in check_legacy_flags(clf, vars(ns)):
        print(f"note: {note}", file=sys.stderr)
    if ns.labels:
        clf.labels = read_labels_file(ns.labels, clf)
    if clf.unknown_note:
        print(f"note: {clf.unknown_note}", file=sys.stderr)
        if ns.unknown_threshold is not None:
            print("note: --unknown_threshold ignored: this model has no unknown score", file=sys.stderr)
    elif ns.unknown_threshold is not None and clf.multi_label:
        print("note: --unknown_threshold ignored: multi-label models have no unknown score", file=sys.stderr)
    elif ns.unknown_threshold is not None:
        clf.unknown_threshold = ns.unknown_threshold
    top_k = ns.num_top_predictions or ns.top_k
    if not ns.image:
        raise RetrainError("no images given: pass --image PATH [PATH ...] (files or folders)")
    paths = expand_image_paths(ns.image)
    if not paths:
        raise RetrainError(f"no image files found in {', '.join(map(repr, ns.image))}")
    failed = 0
    single = len(paths) == 1 and not ns.json
    for path, preds, reason in clf.classify_files(paths, top_k=top_k):
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        if preds is None:
            failed += 1
            if ns.json:
                print(json.dumps({"image": shown, "error": reason}, ensure_ascii=False), flush=True)
            else:
                print(f"error: {shown}: {reason}", file=sys.stderr)
            continue
        if ns.json:
            print(json.dumps({"image": shown, **preds.to_dict()}, ensure_ascii=False), flush=True)
        else:
            if not single:
                print(shown)
            if preds.labels is not None:  # a multi-label model: the chosen labels first
                print(
                    f"labels: {', '.join(preds.labels)}" if preds.labels else "no label above its threshold"
                )
                preds = preds[:top_k] if top_k else preds
            elif preds.unknown:
                print(
                    f"unknown (score {preds.unknown_score:.3f} > {clf.unknown_threshold:.3f}; "
                    f"closest: {preds[0].label} {preds[0].score:.5f})"
                )
            for p in preds:
                print(f"{p.label} {p.score:.5f}")
            if not single:
                print()
    sys.stdout.flush()  # a reader that went away shows up here, inside _run, rather than at exit
    return 3 if failed else 0


def _latest_graph() -> str:
    """The model of the newest finished run here: what ``label_image`` and ``retrain serve`` use without --graph."""
    path = Path("retrain_runs") / "latest" / "output_graph.onnx"
    if not path.exists():
        raise RetrainError(
            "no --graph given and no retrain_runs/latest/output_graph.onnx here; "
            "pass --graph PATH (the file written by retrain --output_graph)"
        )
    return str(path)


# -- retrain serve ----------------------------------------------------------------------------------
def serve_parser() -> _Parser:
    from retrain.serve import DEFAULT_PORT, Limits

    d = Limits()
    p = _Parser(
        prog="retrain serve",
        description="Serve a retrained model over HTTP: POST /v1/classify (image body or multipart files), "
        "GET /v1/model, GET /healthz, and a page at / to try it in a browser.",
        epilog=EXIT_CODES,
    )
    _add(
        p,
        "graph",
        default="",
        help="model written by retrain (an .onnx file or a --saved_model_dir folder; "
        "default: the latest run's retrain_runs/latest/output_graph.onnx)",
    )
    _add(p, "host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    _add(p, "port", type=int, default=DEFAULT_PORT, help="TCP port (0 picks a free one)")
    _add(p, "max_batch", type=int, default=d.max_batch, help="images run through the model together at most")
    _add(
        p,
        "max_wait_ms",
        type=float,
        default=d.max_wait_ms,
        help="how long an image waits for a batch to fill",
    )
    _add(p, "max_body_bytes", type=int, default=d.max_body_bytes, help="largest request body accepted")
    _add(
        p,
        "max_pixels",
        type=int,
        default=d.max_pixels,
        help="largest image accepted, in pixels (width x height)",
    )
    _add(p, "max_images", type=int, default=d.max_images, help="files per request at most")
    _add(
        p,
        "max_queue",
        type=int,
        default=d.max_queue,
        help="images waiting for the model before answering 503",
    )
    _add(
        p,
        "max_in_flight",
        type=int,
        default=d.max_in_flight,
        help="classify requests served at once; more "
        "are answered 503 with Retry-After before their body is read (memory stays below about this many "
        "times --max_body_bytes)",
    )
    _add(p, "num_threads", type=int, default=0, help="inference threads (0 = automatic)")
    _add(
        p,
        "unknown_threshold",
        type=float,
        default=None,
        help="call an image unknown above this unknown_score (default: the threshold stored in the model)",
    )
    _add(
        p,
        "log_level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server messages (debug also logs every request)",
    )
    return p


def serve_main(argv: Sequence[str] | None = None) -> int:
    ns = serve_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return _run(_serve_command, ns)


def _serve_command(ns: argparse.Namespace) -> int:
    from retrain.serve import serve

    graph = ns.graph or _latest_graph()
    if not Path(graph).exists():
        raise RetrainError(f"--graph {graph!r} does not exist; pass the model file written by retrain")
    serve(
        graph,
        host=ns.host,
        port=ns.port,
        log_level=ns.log_level,
        max_batch=ns.max_batch,
        max_wait_ms=ns.max_wait_ms,
        max_body_bytes=ns.max_body_bytes,
        max_pixels=ns.max_pixels,
        max_images=ns.max_images,
        max_queue=ns.max_queue,
        max_in_flight=ns.max_in_flight,
        threads=ns.num_threads or None,
        unknown_threshold=ns.unknown_threshold,
    )
    return 0


# -- retrain export ---------------------------------------------------------------------------------
def export_parser() -> _Parser:
    from retrain.convert import EXPORT_FORMATS, NOT_OFFERED
    from retrain.quantize import MAX_CALIBRATION_IMAGES

    formats = "; ".join(f"{k}: {v}" for k, v in EXPORT_FORMATS.items())
    p = _Parser(
        prog="retrain export",
        description=f"Write a retrained model in another format and report its size and accuracy change. {formats}. "
        f"Not offered: {', '.join(NOT_OFFERED)} (see docs/deploy.md for why).",
        epilog=EXIT_CODES,
    )
    _add(p, "graph", required=True, help="model written by retrain (output_graph.onnx)")
    _add(p, "to", required=True, help=f"format: {', '.join(EXPORT_FORMATS)}")
    _add(p, "output", required=True, help="file to write")
    _add(
        p,
        "image_dir",
        default=None,
        help="class sub-folders named like the model's labels: the accuracy change "
        "is measured on all their images, and int8 is calibrated on them",
    )
    _add(p, "calibration_dir", default=None, help="photos to calibrate int8 on, instead of --image_dir")
    _add(
        p,
        "max_calibration_images",
        type=int,
        default=MAX_CALIBRATION_IMAGES,
        help="calibration images used at most",
    )
    return p


def export_main(argv: Sequence[str] | None = None) -> int:
    ns = export_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return _run(_export_command, ns)


def _export_command(ns: argparse.Namespace) -> int:
    from retrain.convert import export_model

    report = export_model(
        ns.graph,
        ns.to,
        ns.output,
        image_dir=ns.image_dir,
        calibration_dir=ns.calibration_dir,
        max_calibration_images=ns.max_calibration_images,
    )
    print(report.summary("image_dir"))
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


# -- retrain ui --------------------------------------------------------------------------------------
def ui_parser() -> _Parser:
    from retrain.ui import DEFAULT_PORT

    p = _Parser(
        prog="retrain ui",
        description="A local web app for the whole loop: choose or upload photos, "
        "train, read the report, try the model and download it (docs/ui.md).",
        epilog=EXIT_CODES,
    )
    _add(
        p, "image_dir", default=None, help="folder of class folders to start with (only read, never written)"
    )
    _add(
        p, "project", default="retrain_project", help="folder the app writes to: uploaded photos, runs, cache"
    )
    _add(
        p,
        "host",
        default="127.0.0.1",
        help="address to listen on; anything but loopback prints an access token",
    )
    _add(p, "port", type=int, default=DEFAULT_PORT, help="TCP port (0 picks a free one)")
    _add(
        p, "no_browser", action="store_true", help="do not open a browser (it opens only on a desktop anyway)"
    )
    return p


def ui_main(argv: Sequence[str] | None = None) -> int:
    ns = ui_parser().parse_args(list(sys.argv[1:] if argv is None else argv))

    def go() -> int:
        from retrain.ui import run_ui

        run_ui(
            ns.project,
            image_dir=ns.image_dir,
            host=ns.host,
            port=ns.port,
            open_browser=False if ns.no_browser else None,
        )
        return 0

    return _run(go)


# Sub-commands of `retrain`: name -> main(argv) -> exit code.
def extract_main(argv: Sequence[str]) -> int:
    """``retrain extract``: features of a folder or URL, locally or on a Ray cluster (retrain.distributed)."""
    from retrain.distributed import main

    return main(argv)


def report_main(argv: Sequence[str]) -> int:
    """``retrain report RUN_DIR``: rebuild report.html from a finished run (retrain.report)."""
    from retrain.report import main

    return _run(main, argv)


def relabel_main(argv: Sequence[str]) -> int:
    """``retrain relabel label_issues.csv`` / ``--undo LOG`` (retrain.relabel)."""
    from retrain.relabel import main

    return _run(main, argv)


SUBCOMMANDS = {
    "serve": serve_main,
    "export": export_main,
    "extract": extract_main,
    "report": report_main,
    "relabel": relabel_main,
    "ui": ui_main,
}
