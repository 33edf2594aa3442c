"""The ``sanshi-ml`` command: thin typer commands that parse options and call the stage modules."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from sanshi_ml.config import ConfigError, Params, load_params, with_overrides

app = typer.Typer(
    help="Triage suggestions (category, 三事, handling unit, appeal type) for 12345 hotline records.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

log = logging.getLogger("sanshi_ml")

# --------------------------------------------------------------------------------------------------- shared options

ParamsOpt = Annotated[Path | None, typer.Option("--params", help="parameter file (default: ./params.yaml if present)")]
TextColsOpt = Annotated[
    str | None, typer.Option("--text-cols", help="comma-separated text columns, title first: 留言主题,留言详情")
]
SegmentedOpt = Annotated[
    str | None,
    typer.Option("--segmented-col", help="column of text already cut into words (tokens separated by spaces)"),
]
TargetOpt = Annotated[
    list[str] | None,
    typer.Option("--target", help="NAME=COLUMN, repeatable: --target category=一级分类 --target unit=承办单位"),
]
IdOpt = Annotated[str | None, typer.Option("--id-col", help="record id column (default: 留言编号, 工单编号, id, …)")]
TimeOpt = Annotated[
    str | None, typer.Option("--time-col", help="received-time column (default: 留言时间, 受理时间, …)")
]
ModelDirOpt = Annotated[Path | None, typer.Option("--model-dir", help="model directory (default from params)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]
EncodingOpt = Annotated[
    str | None,
    typer.Option(
        "--encoding",
        help="CSV text encoding, e.g. gb18030, utf-8, utf-16, big5 (default: the byte-order mark, else detected)",
    ),
]
SheetOpt = Annotated[
    str | None,
    typer.Option("--sheet", help="Excel: the sheet's name or number, 1 = the first (default: the first sheet)"),
]
HeaderRowOpt = Annotated[
    int | None,
    typer.Option(
        "--header-row",
        min=1,
        help="row of the column names, 1 = the first (default: the first row holding the "
        "needed columns, so title rows above the header are skipped)",
    ),
]


class UsageError(ValueError):
    """A command-line option that cannot be used."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("jieba", "matplotlib", "PIL", "urllib3", "alembic", "mlflow", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _known_errors() -> tuple[type[BaseException], ...]:
    from sanshi_ml.artifacts import ArtifactError
    from sanshi_ml.core.model import ModelError
    from sanshi_ml.core.policy import PolicyError
    from sanshi_ml.data.records import RecordError

    # Called only when an error is raised, so importing mlflow (slow) here costs nothing otherwise.
    from sanshi_ml.tracking import TrackingError

    return (
        ConfigError,
        RecordError,
        ArtifactError,
        PolicyError,
        ModelError,
        UsageError,
        TrackingError,
        FileNotFoundError,
    )


def friendly_errors(func: Callable) -> Callable:
    """Turn the project's own errors into one clear line on stderr and exit status 2, never a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _known_errors() as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        except OSError as error:  # a full disk, a file-size limit, a permission the commands did not check first
            where = f"{error.filename}: " if error.filename else ""
            typer.secho(f"error: {where}{error.strerror or error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def parse_targets(values: list[str] | None) -> dict[str, str] | None:
    """``["category=一级分类", …]`` to a mapping; a bare ``一级分类`` names the target after its column."""
    if not values:
        return None
    targets: dict[str, str] = {}
    for value in values:
        name, sep, column = value.partition("=")
        name, column = name.strip(), column.strip()
        if not sep:
            name, column = value.strip(), value.strip()
        if not name or not column:
            raise UsageError(f"--target {value!r}: expected NAME=COLUMN")
        if name in targets:
            raise UsageError(f"--target {name} given twice")
        targets[name] = column
    return targets


def build_params(
    params_file: Path | None,
    text_cols: str | None = None,
    segmented_col: str | None = None,
    targets: list[str] | None = None,
    id_col: str | None = None,
    time_col: str | None = None,
    encoding: str | None = None,
    sheet: str | None = None,
    header_row: int | None = None,
    **dotted: Any,
) -> Params:
    """params.yaml with command-line options laid over it (``data.encoding``, ``data.sheet`` and ``data.header_row``
    say how the command's files are read)."""
    params = load_params(params_file)
    overrides: dict[str, Any] = {
        f"data.columns.{k}": v
        for k, v in {
            "id_col": id_col,
            "time_col": time_col,
            "segmented_col": segmented_col,
            "targets": parse_targets(targets),
        }.items()
    }
    overrides.update({"data.encoding": encoding, "data.sheet": sheet, "data.header_row": header_row})
    if _columns_given(text_cols, segmented_col, targets):
        # Another export: its id and time columns are recognised by name unless given, not taken from params.yaml.
        params.data.columns.id_col = None
        params.data.columns.time_col = None
        params.data.columns.segmented_col = None
        # Nor is how params.yaml's export is read: its encoding, sheet and header row are detected unless given.
        params.data.encoding = params.data.sheet = params.data.header_row = None
    if text_cols is not None:
        overrides["data.columns.text_cols"] = [c.strip() for c in text_cols.split(",") if c.strip()]
    elif segmented_col is not None:
        overrides["data.columns.text_cols"] = []
    overrides.update(dotted)
    params = with_overrides(params, overrides)
    if params.split.stratify_target not in (None, *params.data.columns.targets):
        params.split.stratify_target = None  # stratify on the first target of this export
    return params


def _columns_given(*values: Any) -> bool:
    return any(v is not None for v in values)


# ----------------------------------------------------------------------------------------------------------- commands


@app.command()
@friendly_errors
def train(
    data: Annotated[list[Path] | None, typer.Argument(help="labelled export(s): CSV, Excel, Parquet or JSONL")] = None,
    text_cols: TextColsOpt = None,
    segmented_col: SegmentedOpt = None,
    target: TargetOpt = None,
    id_col: IdOpt = None,
    time_col: TimeOpt = None,
    model_dir: ModelDirOpt = None,
    params_file: ParamsOpt = None,
    encoding: EncodingOpt = None,
    sheet: SheetOpt = None,
    header_row: HeaderRowOpt = None,
    holdout: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=0.9,
            help="share of rows to set aside first and measure a model fitted without them on; the saved "
            "model is then refitted on all rows (default split.holdout, 0: none)",
        ),
    ] = None,
    test_size: Annotated[float | None, typer.Option(hidden=True, help="renamed --holdout")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the holdout split")] = None,
    target_accuracy: Annotated[
        float | None, typer.Option(help="accuracy that predictions accepted without review must reach")
    ] = None,
    C: Annotated[float | None, typer.Option("--C", help="inverse regularisation of the linear classifiers")] = None,
    backend: Annotated[str | None, typer.Option(help="segmenter: rjieba (default) or jieba")] = None,
    track: Annotated[bool | None, typer.Option("--track/--no-track", help="log the run to MLflow")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train a model on every labelled row and save it.

    Its figures are the out-of-fold estimate: every row predicted by models and a calibration chain fitted without
    it. With --holdout, a share of the rows is first set aside and measured by a model fitted on the rest, and the
    saved model is then refitted on all rows.
    """
    _setup_logging(verbose)
    from sanshi_ml.evaluation.metrics import summary_lines
    from sanshi_ml.stages.train import train as run_train

    if test_size is not None:
        if holdout is not None:
            raise UsageError("--test-size is the old name of --holdout; give one of them")
        log.warning(
            "--test-size is now --holdout: the saved model trains on every row, and the holdout is "
            "measured by a model fitted without it"
        )
        holdout = test_size
    params = build_params(
        params_file,
        text_cols,
        segmented_col,
        target,
        id_col,
        time_col,
        encoding,
        sheet,
        header_row,
        **{
            "split.holdout": holdout,
            "split.seed": seed,
            "train.target_accuracy": target_accuracy,
            "train.C": C,
            "text.backend": backend,
            "train.model_dir": str(model_dir) if model_dir else None,
        },
    )
    sources = data or [Path(params.data.path)]
    result = run_train(sources, params, progress=lambda m: typer.echo(m, err=True), track=track)
    typer.echo(f"model: {result.model_dir}  (trained on all {len(result.records)} rows)")
    typer.echo(f"figures: {result.metadata['estimate']['description']}")
    for line in summary_lines(result.metrics):
        typer.echo(line)
    if result.holdout is not None:
        typer.echo(f"holdout figures: {result.holdout.describe(len(result.records))}")
        for line in summary_lines(result.holdout.metrics):
            typer.echo(line)


@app.command()
@friendly_errors
def tune(
    data: Annotated[list[Path] | None, typer.Argument(help="labelled export(s): CSV, Excel, Parquet or JSONL")] = None,
    text_cols: TextColsOpt = None,
    segmented_col: SegmentedOpt = None,
    target: TargetOpt = None,
    id_col: IdOpt = None,
    time_col: TimeOpt = None,
    params_file: ParamsOpt = None,
    encoding: EncodingOpt = None,
    sheet: SheetOpt = None,
    header_row: HeaderRowOpt = None,
    rank_by: Annotated[
        str | None,
        typer.Option(
            "--rank-by", help="target whose cross-validated macro-F1 ranks the settings (default: tune.target)"
        ),
    ] = None,
    cv: Annotated[int | None, typer.Option("--cv", min=2, help="folds per setting (default: tune.cv)")] = None,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", min=1, help="settings to try (default: tune.n_trials)")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="params file written with the best setting")] = Path(
        "params.tuned.yaml"
    ),
    track: Annotated[bool | None, typer.Option("--track/--no-track", help="log the search to MLflow")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Search tune.space in params.yaml by cross-validation on the training split; write the best as a params file."""
    _setup_logging(verbose)
    from sanshi_ml.data.records import ReadOptions, load_many, split_indices, subset
    from sanshi_ml.stages.train import column_map
    from sanshi_ml.stages.tune import tune as run_tune
    from sanshi_ml.stages.tune import write_best

    params = build_params(params_file, text_cols, segmented_col, target, id_col, time_col, encoding, sheet, header_row)
    if not params.tune.space:
        raise UsageError(
            "tune.space in the params file is empty: give the values to try, e.g. "
            "'train.C: [0.3, 0.7, 1.5]' (see docs/analysts.md)"
        )
    records = load_many(
        [str(p) for p in (data or [Path(params.data.path)])], column_map(params), ReadOptions.from_config(params.data)
    )

    def say(message: str) -> None:
        typer.echo(message, err=True)

    if params.split.holdout:
        # The untouched holdout that train measures on is left out, so the winner is never chosen on it.
        records = subset(
            records, split_indices(records, params.split.holdout, params.split.seed, params.split.stratify_target)[0]
        )
        say(f"tuning on {len(records)} rows (the split.holdout rows stay unseen)")
    else:
        say(f"tuning on all {len(records)} rows by cross-validation")
    result = run_tune(records, params, target=rank_by, cv=cv, n_trials=n_trials, track=track, progress=say)
    for line in result.lines():
        typer.echo(line)
    path = write_best(result, params, out)
    typer.echo(f"best setting written to {path}: train with `sanshi-ml train --params {path}`")
    if result.parent_run_id:
        typer.echo(f"MLflow: parent run {result.parent_run_id}, one nested run per setting")


@app.command()
@friendly_errors
def evaluate(
    data: Annotated[list[Path] | None, typer.Argument(help="labelled export(s) to evaluate on")] = None,
    model_dir: ModelDirOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="report directory (metrics.json + PNG plots)")] = None,
    cv: Annotated[int | None, typer.Option("--cv", help="also run K-fold cross-validation (K ≥ 2)")] = None,
    text_cols: TextColsOpt = None,
    segmented_col: SegmentedOpt = None,
    target: TargetOpt = None,
    id_col: IdOpt = None,
    time_col: TimeOpt = None,
    params_file: ParamsOpt = None,
    verbose: VerboseOpt = False,
    encoding: EncodingOpt = None,
    sheet: SheetOpt = None,
    header_row: HeaderRowOpt = None,
) -> None:
    """Evaluate a saved model: metrics.json (per target, per class, per slice, ECE) and plots.

    Rows the model trained on are graded by their out-of-fold outcomes recorded at training, never by the model
    itself; other rows are predicted by the model. metrics.json says which is which ("source", "scope", "rows").
    """
    _setup_logging(verbose)
    from sanshi_ml.data.records import ColumnMap
    from sanshi_ml.evaluation.metrics import summary_lines
    from sanshi_ml.stages.evaluate import evaluate as run_evaluate

    if cv is not None and cv == 1:
        raise UsageError("--cv needs K ≥ 2 folds")
    params = build_params(params_file, text_cols, segmented_col, target, id_col, time_col, encoding, sheet, header_row)
    # Without column options, the columns recorded with the model are used.
    columns = (
        ColumnMap.from_config(params.data.columns)
        if _columns_given(text_cols, segmented_col, target, id_col, time_col)
        else None
    )
    model_dir = model_dir or Path(params.train.model_dir)
    payload = run_evaluate(
        data or [Path(params.data.path)],
        model_dir,
        out or Path(params.evaluate.out_dir),
        params,
        cv=cv if cv is not None else params.evaluate.cv,
        columns=columns,
        progress=lambda m: typer.echo(m, err=True),
    )
    typer.echo(f"figures: {payload['scope']}")
    for line in summary_lines(payload["targets"]):
        typer.echo(line)
    if "holdout" in payload:
        typer.echo(f"holdout figures: {payload['holdout']['description']}")
        for line in summary_lines(payload["holdout"]["targets"]):
            typer.echo(line)
    if "cv" in payload:
        for name, metrics in payload["cv"]["targets"].items():
            f1 = metrics["macro_f1"]
            spread = f" ± {f1['std']:.3f}" if f1["std"] is not None else ""
            typer.echo(f"{name:>10}: {payload['cv']['k']}-fold macro-F1 {f1['mean']:.3f}{spread}")


@app.command()
@friendly_errors
def predict(
    texts: Annotated[
        list[str] | None, typer.Argument(help="request text(s); '-' reads one text a line from stdin")
    ] = None,
    model_dir: ModelDirOpt = None,
    title: Annotated[str | None, typer.Option(help="title of the request (with a single text)")] = None,
    top_k: Annotated[int, typer.Option(min=1, max=20, help="labels shown per target")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines instead of a table")] = False,
    params_file: ParamsOpt = None,
) -> None:
    """Suggest category, 三事, unit and appeal type for request text(s), with confidence and reasons."""
    _setup_logging(False)
    from sanshi_ml.artifacts import load_model
    from sanshi_ml.suggest import Suggester, text_status

    params = load_params(params_file)
    if not texts or texts == ["-"]:
        if texts == ["-"] or not sys.stdin.isatty():
            texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not texts:
            raise UsageError("no text given: pass the request text as an argument or on stdin with '-'")
    if title is not None and len(texts) != 1:
        raise UsageError("--title goes with exactly one text")
    for number, text in enumerate(texts, start=1):
        status = text_status(text, params.serve.max_text_chars)
        if status != "ok":
            raise UsageError(
                f"text {number}: {status.replace('_', ' ')} (limit {params.serve.max_text_chars} characters)"
            )
    suggester = Suggester.from_loaded(load_model(model_dir or Path(params.train.model_dir)), params.policy.path)
    suggestions = suggester.suggest([(title, t) for t in texts], top_k=top_k)
    for text, suggestion in zip(texts, suggestions):
        if as_json:
            typer.echo(json.dumps(suggestion, ensure_ascii=False))
            continue
        typer.echo(f"「{text[:60]}{'…' if len(text) > 60 else ''}」")
        for name, field in suggestion["fields"].items():
            flag = "  ⚠ 需人工复核 " + ",".join(field["review_reasons"]) if field["needs_review"] else ""
            extra = ""
            if field.get("sanshi"):
                s = field["sanshi"]
                extra = f"  [{s['colour']} · {s['handling_mode']} · {s['time_limit_days']}天]"
            reasons = f"  依据: {'、'.join(field['reasons'])}" if field["reasons"] else ""
            plausible = field.get("plausible")
            if plausible is not None and plausible != [field["label"]]:
                reasons += f"  可能: {'/'.join(plausible) or '(无)'}"
            typer.echo(f"  {name:>9}: {field['label']} ({field['confidence']:.2f}){extra}{flag}{reasons}")


@app.command()
@friendly_errors
def prepare(
    data: Annotated[list[Path] | None, typer.Argument(help="labelled export(s): CSV, Excel, Parquet or JSONL")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="output directory (default: prepare.out_dir)")] = None,
    text_cols: TextColsOpt = None,
    segmented_col: SegmentedOpt = None,
    target: TargetOpt = None,
    id_col: IdOpt = None,
    time_col: TimeOpt = None,
    params_file: ParamsOpt = None,
    verbose: VerboseOpt = False,
    encoding: EncodingOpt = None,
    sheet: SheetOpt = None,
    header_row: HeaderRowOpt = None,
) -> None:
    """Validate labelled export(s) and write them as one records.parquet (+ prepare.json) for train and evaluate."""
    _setup_logging(verbose)
    from sanshi_ml.stages.prepare import prepare as run_prepare

    params = build_params(params_file, text_cols, segmented_col, target, id_col, time_col, encoding, sheet, header_row)
    report = run_prepare(
        data or [Path(params.data.path)],
        params,
        out or Path(params.prepare.out_dir),
        progress=lambda m: typer.echo(m, err=True),
    )
    typer.echo(f"prepared: {report['output']}  ({report['rows']} records, data sha256 {report['data_sha256'][:12]})")


@app.command()
@friendly_errors
def promote(
    run_id: Annotated[str | None, typer.Argument(help="MLflow run id of a `sanshi-ml train` run")] = None,
    best: Annotated[
        str | None,
        typer.Option(
            "--best", help="promote the finished run with the best value of this metric, e.g. category.macro_f1"
        ),
    ] = None,
    lowest: Annotated[
        bool, typer.Option("--lowest", help="with --best: the lowest value wins (e.g. sanshi.ece)")
    ] = False,
    params_file: ParamsOpt = None,
) -> None:
    """Register a run's model (as tracking.registered_model) and move the alias (tracking.alias) to it."""
    _setup_logging(False)
    if (run_id is None) == (best is None):
        raise UsageError("give a RUN_ID or --best METRIC (one of them)")
    from sanshi_ml.tracking import TrackingError, champion_uri, tracking_uri
    from sanshi_ml.tracking import promote as run_promote

    params = load_params(params_file)
    try:
        version = run_promote(run_id, params, best_metric=best, lowest=lowest)
    except TrackingError as error:
        raise UsageError(str(error)) from None
    typer.echo(
        f"{params.tracking.registered_model} version {version.version} (run {version.run_id}) is now "
        f"{champion_uri(params)}  [{tracking_uri(params)}]"
    )


@app.command()
@friendly_errors
def serve(
    model_dir: ModelDirOpt = None,
    model_uri: Annotated[
        str | None,
        typer.Option(
            "--model-uri", help="MLflow registry URI instead of a directory, e.g. models:/sanshi-triage@champion"
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="worker processes, each with its own copy of the model; one per core")
    ] = 1,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", help="feedback store: sqlite:///feedback.db (default) or postgresql://user@host/db"
        ),
    ] = None,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="log every request")] = False,
    params_file: ParamsOpt = None,
) -> None:
    """Serve suggestions over HTTP (FastAPI + uvicorn), with the clerk page at / and the API docs at /docs.

    Other settings come from SANSHI_* variables: SANSHI_API_KEY (feedback and export), SANSHI_OPEN_SUGGESTIONS,
    SANSHI_STRICT, SANSHI_MAX_TEXT_CHARS, SANSHI_MAX_BATCH, SANSHI_ALLOWED_HOSTS (see docs/serving.md).
    """
    _setup_logging(False)
    import os

    import uvicorn
    from pydantic import ValidationError

    from sanshi_ml.artifacts import UNSIGNED_NOTE, model_key, read_metadata
    from serve.settings import ENV_PREFIX, Settings
    from serve.store import FeedbackStore, StoreError

    try:
        settings = Settings.load(
            params_file, model_dir=model_dir, model_uri=model_uri, database_url=database_url, host=host
        )
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        raise UsageError(f"server settings: {problems}") from None
    if settings.model_dir is not None:
        read_metadata(settings.model_dir)  # a wrong directory fails here, in one line, not later in a worker
    try:  # an unusable database too (a probe row written and read back); and the table exists before workers race
        store = FeedbackStore(settings.database_url)
    except StoreError as error:
        raise UsageError(str(error)) from None
    health = store.check()
    store.close()
    if not health.ok:
        raise UsageError(f"feedback store unusable ({health.reason}): {health.message}")
    if settings.api_key is None:
        log.warning("SANSHI_API_KEY is not set: /v1/feedback and /v1/feedback/export refuse every request")
    if model_key(settings.model_dir) is None:
        log.warning("the model is %s", UNSIGNED_NOTE)
    if settings.allowed_hosts is None and host in ("0.0.0.0", "::"):
        log.warning(
            "listening on every interface, but answering only for %s: set SANSHI_ALLOWED_HOSTS to the names clerks use",
            ", ".join(settings.trusted_hosts),
        )
    log.info(
        "serving %s on http://%s:%d (%d worker%s)",
        settings.model_source,
        host,
        port,
        workers,
        "s" if workers > 1 else "",
    )
    # Slow or idle clients: idle keep-alive connections close after keep_alive_timeout seconds, request heads are
    # limited in size (h11); a request body has body_timeout seconds (the app answers 408).
    limits = {
        "timeout_keep_alive": settings.keep_alive_timeout,
        "limit_concurrency": settings.limit_concurrency,
        "h11_max_incomplete_event_size": 16 * 1024,
        "timeout_graceful_shutdown": 10,
    }
    if workers == 1:
        from serve.app import create_app

        uvicorn.run(create_app(settings), host=host, port=port, access_log=access_log, log_level="info", **limits)
        return
    # Worker processes build their own app from the environment, so the resolved settings travel there.
    for name in (
        "model_dir",
        "model_uri",
        "tracking_uri",
        "database_url",
        "policy_path",
        "max_text_chars",
        "max_batch",
        "top_k",
        "host",
    ):
        value = getattr(settings, name)
        if value is not None:
            os.environ[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    uvicorn.run(
        "serve.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=access_log,
        log_level="info",
        **limits,
    )


@app.command()
@friendly_errors
def score(
    inputs: Annotated[list[str], typer.Argument(help="export(s) to score: CSV, Excel, Parquet or JSONL; globs work")],
    out: Annotated[Path, typer.Option("--out", help="output .parquet or .csv (with --dask: a .parquet directory)")],
    model_dir: ModelDirOpt = None,
    text_cols: TextColsOpt = None,
    segmented_col: SegmentedOpt = None,
    id_col: IdOpt = None,
    time_col: TimeOpt = None,
    encoding: EncodingOpt = None,
    sheet: SheetOpt = None,
    header_row: HeaderRowOpt = None,
    keep_cols: Annotated[
        str | None,
        typer.Option(
            "--keep-cols",
            help="comma-separated input columns copied to the output as they are (e.g. the archive's "
            "own 承办单位, to audit past dispatch)",
        ),
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="records per chunk (default from params)")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="worker processes; 0 = every core")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="finish an interrupted run from its checkpoints")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="discard an unfinished run and start again")] = False,
    dask: Annotated[
        str | None,
        typer.Option(
            "--dask", help="run on Dask: a scheduler address (tcp://host:8786) or local:N for a local cluster"
        ),
    ] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="三事 责任清单 YAML (default: the model's)")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
    params_file: ParamsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Score an archive in chunks: predictions, confidence, review flags, 三事 colour and a status per record."""
    _setup_logging(verbose)
    from sanshi_ml.data.records import ColumnMap, ReadOptions
    from sanshi_ml.scoring import score as run_score

    params = build_params(params_file, text_cols, segmented_col, None, id_col, time_col, encoding, sheet, header_row)
    # Without column options, the columns recorded with the model are used.
    columns = (
        ColumnMap.from_config(params.data.columns).without_targets()
        if _columns_given(text_cols, segmented_col, id_col, time_col)
        else None
    )
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    result = run_score(
        inputs,
        model_dir or Path(params.train.model_dir),
        out,
        columns=columns,
        chunk_size=chunk_size or params.score.chunk_size,
        jobs=params.score.jobs if jobs is None else jobs,
        resume=resume,
        dask=dask,
        keep_cols=[c.strip() for c in (keep_cols or "").split(",") if c.strip()],
        max_text_chars=params.score.max_text_chars,
        policy_path=policy or params.policy.path,
        overwrite=overwrite,
        progress=progress,
        read=ReadOptions.from_config(params.data),
        say=lambda m: typer.echo(m, err=True),
    )
    typer.echo(f"{result.out}: {result.rows} records, {result.records_per_second:,.0f} records/s")


@app.command()
@friendly_errors
def report(
    scored: Annotated[Path, typer.Argument(help="a scored archive (.parquet, .csv, or a Dask .parquet directory)")],
    out: Annotated[Path, typer.Option("--out", help="report directory (CSV tables + PNG charts)")],
    policy: Annotated[str | None, typer.Option("--policy", help="三事 责任清单 YAML for the colours")] = None,
    top_units: Annotated[int | None, typer.Option(min=1, help="units shown in the top-units chart")] = None,
    params_file: ParamsOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Counts by 三事, category, unit, appeal type and month, the share flagged for review, and charts."""
    _setup_logging(verbose)
    from sanshi_ml.stages.report import report as run_report

    params = load_params(params_file)
    result = run_report(
        scored,
        out,
        policy_path=policy or params.policy.path,
        top_units=top_units or params.report.top_units,
        say=lambda m: typer.echo(m, err=True),
    )
    typer.echo(f"{result.out_dir}: {len(result.csv)} tables, {len(result.png)} charts")


def main() -> None:  # pragma: no cover - console entry point
    app()
