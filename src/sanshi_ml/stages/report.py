"""Counts and charts of a scored archive: how many 公事, 共事 and 家事, by category, unit, appeal type and month.

The scored file is read in batches and only the columns the report needs, so a year of a large city's hotline
(tens of millions of rows) is summarised in flat memory. Everything is written as CSV (for people who want the
numbers) and PNG (for people who would rather look): monthly 三事 stacked bars in the 责任清单's colours, and the
top handling units.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sanshi_ml.core.policy import TriagePolicy, load_policy
from sanshi_ml.data.outputs import check_writable, writing
from sanshi_ml.data.records import RecordError

log = logging.getLogger(__name__)

TARGET_TITLES = {"category": "类别", "sanshi": "三事", "unit": "承办单位", "appeal": "诉求类型"}
NO_MONTH = "无时间"
UNSCORED = "(未评分)"
OTHER_COLOUR = "#9aa0a6"


@dataclass
class Tally:
    """Running counts over the batches of a scored archive."""

    rows: int = 0
    status: Counter = field(default_factory=Counter)
    labels: dict[str, Counter] = field(default_factory=dict)
    review: dict[str, Counter] = field(default_factory=dict)
    any_review: int = 0
    scored: int = 0
    month_sanshi: Counter = field(default_factory=Counter)
    month_review: Counter = field(default_factory=Counter)
    month_rows: Counter = field(default_factory=Counter)
    unit_sanshi: Counter = field(default_factory=Counter)


def scored_files(path: str | Path) -> list[Path]:
    """The files of a scored archive: one Parquet or CSV file, or a directory of Parquet parts (Dask output)."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: scored archive not found (write one with `sanshi-ml score`)")
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise RecordError(f"{path}: directory holds no .parquet files")
        return files
    if path.suffix.lower() not in (".parquet", ".pq", ".csv"):
        raise RecordError(f"{path}: expected a scored .parquet or .csv file (or a directory of .parquet parts)")
    return [path]


def _unreadable(path: Path, error: Exception) -> RecordError:
    kind = "CSV" if path.suffix.lower() == ".csv" else "Parquet"
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RecordError(f"{path}: not a scored archive: it cannot be read as {kind} ({detail})")


def _reading_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowException, OSError, ValueError, UnicodeError, pd.errors.ParserError, pd.errors.EmptyDataError)


def _columns_of(path: Path) -> list[str]:
    if path.stat().st_size == 0:
        raise RecordError(f"{path}: the file is empty, not a scored archive (write one with `sanshi-ml score`)")
    try:
        if path.suffix.lower() == ".csv":
            return list(pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns)
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    except _reading_errors() as error:
        raise _unreadable(path, error) from None


def _batches(path: Path, columns: list[str], size: int = 200_000) -> Iterator[pd.DataFrame]:
    """The columns of a scored file in batches; a file damaged further on is one error naming it."""
    try:
        if path.suffix.lower() == ".csv":
            yield from pd.read_csv(
                path,
                usecols=columns,
                chunksize=size,
                encoding="utf-8-sig",
                dtype=str,
                keep_default_na=False,
                na_values=[""],
            )
            return
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=size, columns=columns):
            yield batch.to_pandas()
    except _reading_errors() as error:
        raise _unreadable(path, error) from None


def _as_bool(series: pd.Series) -> pd.Series:
    if series.dtype == bool:
        return series
    if series.dtype == object or pd.api.types.is_string_dtype(series):
        return series.astype(str).str.lower().isin(["true", "1"])
    return series.fillna(False).astype(bool)


def targets_of(columns: list[str]) -> tuple[list[str], str | None]:
    """The scored targets (columns T with T_confidence) and which of them is the 三事 target (has T_colour)."""
    targets = [c for c in columns if f"{c}_confidence" in columns and f"{c}_needs_review" in columns]
    sanshi = next((t for t in targets if f"{t}_colour" in columns), None)
    return targets, sanshi


def tally(path: str | Path, unit_target: str | None = "unit") -> tuple[Tally, list[str], str | None, str | None]:
    """Count a scored archive batch by batch; returns the tally, the targets, the 三事 target and the unit target."""
    files = scored_files(path)
    columns = _columns_of(files[0])
    targets, sanshi = targets_of(columns)
    if not targets or "status" not in columns:
        raise RecordError(f"{files[0]}: not a scored archive (no T / T_confidence / T_needs_review / status columns)")
    for other in files[1:]:
        missing = [c for c in columns if c not in _columns_of(other)]
        if missing:
            raise RecordError(
                f"{other}: not a part of the same scored archive as {files[0]} (no column "
                f"{', '.join(map(repr, missing))})"
            )
    unit = unit_target if unit_target in targets else None
    wanted = ["status", *targets, *(f"{t}_needs_review" for t in targets)]
    has_time = "received_at" in columns
    if has_time:
        wanted.append("received_at")
    counts = Tally(labels={t: Counter() for t in targets}, review={t: Counter() for t in targets})
    for file in files:
        for frame in _batches(file, wanted):
            _add(counts, frame, targets, sanshi, unit, has_time)
    return counts, targets, sanshi, unit


def _add(
    counts: Tally, frame: pd.DataFrame, targets: list[str], sanshi: str | None, unit: str | None, has_time: bool
) -> None:
    counts.rows += len(frame)
    status = frame["status"].astype(str)
    counts.status.update(status.value_counts().to_dict())
    ok = (status == "ok").to_numpy()
    scored = frame.loc[ok]
    counts.scored += len(scored)
    flagged_any = pd.Series(False, index=scored.index)
    for target in targets:
        labels = scored[target].astype(str)
        flagged = _as_bool(scored[f"{target}_needs_review"])
        flagged_any |= flagged
        counts.labels[target].update(labels.value_counts().to_dict())
        counts.review[target].update(labels[flagged].value_counts().to_dict())
    counts.any_review += int(flagged_any.sum())
    if has_time:
        times = pd.to_datetime(frame["received_at"], errors="coerce")
        months = times.dt.strftime("%Y-%m").fillna(NO_MONTH).astype(str)
    else:
        months = pd.Series(NO_MONTH, index=frame.index)
    counts.month_rows.update(months.value_counts().to_dict())
    scored_months = months[ok]
    counts.month_review.update(scored_months[flagged_any].value_counts().to_dict())
    if sanshi:
        sanshi_labels = scored[sanshi].astype(str)
        counts.month_sanshi.update(Counter(zip(scored_months, sanshi_labels)))
        if unit:
            counts.unit_sanshi.update(Counter(zip(scored[unit].astype(str), sanshi_labels)))


# --------------------------------------------------------------------------------------------------------------------
# Tables


def label_table(counts: Tally, target: str) -> pd.DataFrame:
    """Records per predicted label of one target, with the share flagged for review."""
    labels = counts.labels[target]
    frame = pd.DataFrame({"label": list(labels), "records": list(labels.values())})
    frame["needs_review"] = frame["label"].map(counts.review[target]).fillna(0).astype(int)
    frame = frame.sort_values(["records", "label"], ascending=[False, True], ignore_index=True)
    frame["share"] = frame["records"] / max(counts.scored, 1)
    frame["review_share"] = frame["needs_review"] / frame["records"].clip(lower=1)
    return frame[["label", "records", "share", "needs_review", "review_share"]]


def month_table(counts: Tally, classes: list[str]) -> pd.DataFrame:
    """Records per month (from received_at): all rows, each 三事 class among scored rows, and flagged rows."""
    months = sorted(m for m in counts.month_rows if m != NO_MONTH) + (
        [NO_MONTH] if NO_MONTH in counts.month_rows else []
    )
    frame = pd.DataFrame({"month": months, "records": [counts.month_rows[m] for m in months]})
    for cls in classes:
        frame[cls] = [counts.month_sanshi.get((m, cls), 0) for m in months]
    frame["needs_review"] = [counts.month_review.get(m, 0) for m in months]
    return frame


def review_table(counts: Tally, targets: list[str]) -> pd.DataFrame:
    """Share of scored records flagged for review, per target and for any target."""
    rows = [{"target": t, "scored": counts.scored, "needs_review": sum(counts.review[t].values())} for t in targets]
    rows.append({"target": "any", "scored": counts.scored, "needs_review": counts.any_review})
    frame = pd.DataFrame(rows)
    frame["share"] = frame["needs_review"] / max(counts.scored, 1)
    return frame


def status_table(counts: Tally) -> pd.DataFrame:
    frame = pd.DataFrame({"status": list(counts.status), "records": list(counts.status.values())})
    frame = frame.sort_values("records", ascending=False, ignore_index=True)
    frame["share"] = frame["records"] / max(counts.rows, 1)
    return frame


def unit_table(counts: Tally, classes: list[str], top: int) -> pd.DataFrame:
    """The ``top`` units by records, split by predicted 三事 class."""
    units = Counter()
    for (unit, _cls), n in counts.unit_sanshi.items():
        units[unit] += n
    names = [u for u, _ in sorted(units.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    frame = pd.DataFrame({"unit": names, "records": [units[u] for u in names]})
    for cls in classes:
        frame[cls] = [counts.unit_sanshi.get((u, cls), 0) for u in names]
    return frame


# --------------------------------------------------------------------------------------------------------------------
# Charts


def _thousands():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _pos: f"{value:,.0f}")


def _colours(policy: TriagePolicy, classes: list[str]) -> list[str]:
    return [(policy.class_info(c).colour_hex if policy.class_info(c) else OTHER_COLOUR) for c in classes]


def _class_order(policy: TriagePolicy, seen: list[str]) -> list[str]:
    """The policy's classes first, in the list's order (公事, 共事, 家事), then anything else the model predicted."""
    ordered = [c for c in policy.classes if c in seen]
    return ordered + sorted(c for c in seen if c not in ordered)


def monthly_chart(months: pd.DataFrame, classes: list[str], policy: TriagePolicy, path: Path) -> Path:
    """Stacked bars: records per month by predicted 三事 class, in the policy's colours."""
    from sanshi_ml.evaluation.plotting import pyplot

    plt = pyplot()
    dated = months[months["month"] != NO_MONTH]
    if len(dated):  # every month of the range gets a bar, so a month without records shows as a gap at zero
        span = pd.period_range(dated["month"].iloc[0], dated["month"].iloc[-1], freq="M").strftime("%Y-%m")
        dated = dated.set_index("month").reindex(span, fill_value=0).rename_axis("month").reset_index()
    fig, ax = plt.subplots(figsize=(max(8.0, min(0.16 * len(dated) + 3, 24.0)), 5.0))
    bottom = pd.Series(0, index=dated.index, dtype=float)
    for cls, colour in zip(classes, _colours(policy, classes)):
        ax.bar(
            range(len(dated)),
            dated[cls],
            bottom=bottom,
            color=colour,
            label=cls,
            width=0.85,
            edgecolor="white",
            linewidth=0.3,
        )
        bottom += dated[cls]
    step = max(1, len(dated) // 24)
    ax.set_xticks(range(0, len(dated), step))
    ax.set_xticklabels(dated["month"].iloc[::step], rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, max(len(dated), 1) - 0.4)
    ax.set_ylabel("记录数")
    ax.yaxis.set_major_formatter(_thousands())
    ax.set_title("每月三事分流 (模型建议)")
    ax.legend(title="三事", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    undated = int(months.loc[months["month"] == NO_MONTH, classes].to_numpy().sum()) if classes else 0
    if undated:
        ax.annotate(f"另有 {undated} 条无受理时间", xy=(1, 1.02), xycoords="axes fraction", ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def units_chart(units: pd.DataFrame, classes: list[str], policy: TriagePolicy, path: Path) -> Path:
    """Horizontal bars: the top units by records, each split by predicted 三事 class."""
    from sanshi_ml.evaluation.plotting import pyplot

    plt = pyplot()
    data = units.iloc[::-1].reset_index(drop=True)  # largest at the top
    fig, ax = plt.subplots(figsize=(9.0, max(3.0, 0.38 * len(data) + 1.2)))
    left = pd.Series(0, index=data.index, dtype=float)
    for cls, colour in zip(classes, _colours(policy, classes)):
        ax.barh(data["unit"], data[cls], left=left, color=colour, label=cls, edgecolor="white", linewidth=0.3)
        left += data[cls]
    for y, total in enumerate(data["records"]):
        ax.text(total, y, f" {total:,}", va="center", fontsize=8)
    ax.set_xlabel("记录数")
    ax.xaxis.set_major_formatter(_thousands())
    ax.set_title(f"承办单位 前 {len(data)} 位 (模型建议, 按三事着色)")
    ax.legend(title="三事", frameon=False, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_xlim(0, max(float(data["records"].max()) * 1.12, 1.0) if len(data) else 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def review_chart(review: pd.DataFrame, path: Path) -> Path:
    """Bars: the share of scored records flagged for a person to review, per target and for any target."""
    from sanshi_ml.evaluation.plotting import pyplot

    plt = pyplot()
    names = [TARGET_TITLES.get(t, t) if t != "any" else "任一字段" for t in review["target"]]
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    bars = ax.bar(names, review["share"] * 100, color=["#5f6368"] * (len(names) - 1) + ["#1a73e8"])
    for bar, share in zip(bars, review["share"]):
        ax.text(
            bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{share:.1%}", ha="center", va="bottom", fontsize=9
        )
    ax.set_ylabel("需人工复核 (%)")
    ax.set_ylim(0, 105)
    ax.set_title("需人工复核的比例")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class ReportResult:
    out_dir: Path
    rows: int
    scored: int
    csv: list[Path]
    png: list[Path]

    def lines(self) -> list[str]:
        return [
            f"report of {self.rows} records ({self.scored} scored) in {self.out_dir}: "
            f"{len(self.csv)} CSV tables, {len(self.png)} charts",
            *(f"  {p.name}" for p in self.csv + self.png),
        ]


def report(
    scored: str | Path,
    out_dir: str | Path,
    *,
    policy_path: str | None = None,
    top_units: int = 15,
    say: Callable[[str], None] | None = None,
) -> ReportResult:
    """Write the counts (CSV) and charts (PNG) of a scored archive to ``out_dir``."""
    say = say or log.info
    policy = load_policy(policy_path)
    out_dir = Path(out_dir)
    check_writable(out_dir, "report")
    counts, targets, sanshi, unit = tally(scored, policy.unit_target)
    with writing(out_dir, "the report"):
        out_dir.mkdir(parents=True, exist_ok=True)
    csv: list[Path] = []
    png: list[Path] = []

    def write(frame: pd.DataFrame, name: str) -> pd.DataFrame:
        path = out_dir / name
        with writing(path):
            frame.to_csv(path, index=False, encoding="utf-8-sig")  # BOM: spreadsheet programs read the Chinese
        csv.append(path)
        return frame

    for target in targets:
        write(label_table(counts, target), f"counts_{target}.csv")
    classes = _class_order(policy, list(counts.labels[sanshi])) if sanshi else []
    months = write(month_table(counts, classes), "counts_month.csv")
    review = write(review_table(counts, targets), "review.csv")
    write(status_table(counts), "status.csv")
    with writing(out_dir, "the report's charts"):
        if sanshi and counts.scored:
            png.append(monthly_chart(months, classes, policy, out_dir / "monthly_sanshi.png"))
        if unit and sanshi and counts.scored:
            units = write(unit_table(counts, classes, top_units), "top_units.csv")
            png.append(units_chart(units, classes, policy, out_dir / "top_units.png"))
        if counts.scored:
            png.append(review_chart(review, out_dir / "review_share.png"))
    result = ReportResult(out_dir, counts.rows, counts.scored, csv, png)
    for line in result.lines():
        say(line)
    return result
