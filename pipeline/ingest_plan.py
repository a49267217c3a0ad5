"""The ingest plan: every decision ingest takes before it writes a row, as plain data.

:mod:`pipeline.ingest` reads a source twice. Between the passes, what pass 1 saw (a profile of
each column of a table, or a summary of the arrays) and the ``like=`` training store decide the
store to write: the feature columns and their encodings, the task, the classes, the dtypes, the
chunk size and where the feature statistics come from. Those decisions live here, in functions
that read no file and write nothing, so they are testable on their own:

* :func:`select_columns`: which columns of a table are features and which one is the target;
* :func:`plan_table` / :func:`plan_arrays`: the :class:`IngestPlan` of a table or of arrays;
* :func:`decide_target`: task inference, class naming and the refusal of labels the training
  store does not know, shared by both;
* :meth:`IngestPlan.final_attrs`: the attributes a store gets once every row is written.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Collection, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import IngestError
from pipeline.store import RunningStats, Store, default_chunk_rows

if TYPE_CHECKING:
    from pipeline.ingest import _ColumnProfile

ONEHOT_MAX = 16
MAX_CLASSES_INFERRED = 50
# a text column of more distinct values than this, most of them seen once (more distinct values than
# half its rows), is no category: an identifier, an e-mail, free text; ordinal codes of it would let
# a model learn which row is which. The bundled datasets' categorical columns have at most 42 values
IDENTIFIER_MIN_DISTINCT = 100

# where a data row of the source being ingested is, for a source of several files (a Parquet
# dataset): "row 12 of file 'part.3.parquet'"; None for a single file
ROW_PLACE: ContextVar[Callable[[int], str | None] | None] = ContextVar("ROW_PLACE", default=None)


def data_row(r: int) -> str:
    """How an error names the source's 0-based data row ``r``: with its file and row there when
    the source is a dataset of several files (a Spark or Dask dataset of many part files)."""
    where = ROW_PLACE.get()
    place = where(r) if where is not None else None
    return f"data row {r} (0-based{'; ' + place if place else ''})"


@dataclass(frozen=True)
class Training:
    """What ingest ``like=`` a training store takes from it."""

    path: str
    task: str
    classes: list[str] | None
    target: dict[str, Any]  # the store's ``target`` attribute
    encodings: list[dict[str, Any]]  # empty for stores not ingested from a table
    feature_names: list[str]
    mean: list[float]
    std: list[float]
    n_features: int
    y_ndim: int

    @classmethod
    def of(cls, store: Store) -> Training:
        return cls(
            path=store.path,
            task=store.task,
            classes=store.classes,
            target=dict(store.attrs.get("target") or {}),
            encodings=[dict(e) for e in store.attrs.get("encodings") or []],
            feature_names=list(store.feature_names),
            mean=store.mean.tolist(),
            std=store.std.tolist(),
            n_features=store.n_features,
            y_ndim=int(store.y.ndim),
        )


@dataclass
class LabelProfile:
    """What pass 1 saw of the labels.

    ``strings``: string labels (cleaned) and their counts; ``values``: numeric labels and their
    counts (None: too many distinct ones to be classes). ``kind_from_dtype``: the labels' dtype
    says whether they are strings (arrays); a text column's kind under ``like=`` is the training
    store's instead. ``subject`` and ``hint`` word the errors ("target column 'y'", "check
    --target, or pass --task regression")."""

    kind: str  # "string" or "numeric"
    strings: dict[str, int] = field(default_factory=dict)
    values: dict[float, int] | None = field(default_factory=dict)
    integral: bool = True
    scalar: bool = True  # one value per row
    first_string: tuple[int, str] | None = None  # (row, value) of the first string label
    kind_from_dtype: bool = False
    subject: str = "the labels"
    hint: str = "pass --task regression if this is a target value"


@dataclass
class TargetPlan:
    """The target as the store records it."""

    name: str | None  # None: an unlabelled source (``y`` holds zeros)
    task: str
    string_labels: bool
    classes: list[str] | None
    class_values: list[float] | None
    shape: tuple[int, ...] = ()  # per-row shape of y beyond the row axis
    training: dict[str, Any] | None = None  # the training store's target attribute (like=)

    @property
    def dtype(self) -> np.dtype:
        # regression targets keep float64: float32 rounds 1e8 to a multiple of 8, and a metric
        # computed on rounded targets is not the metric of the data
        return np.dtype(np.int32 if self.task == "classification" else np.float64)


@dataclass
class IngestPlan:
    """The store ingest writes: features, encodings, target, dtypes, chunking, statistics."""

    feature_names: list[str]
    encodings: list[dict[str, Any]]  # table columns (name, kind, fill, categories, offset)
    target: TargetPlan
    x_dtype: np.dtype
    chunk_rows: int
    missing: str
    n_rows: int  # rows to write (after --missing drop, as pass 1 counted them)
    training_stats: tuple[list[float], list[float]] | None = None  # like=: the training mean/std
    fill: np.ndarray | None = None  # arrays: per-feature imputation values

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def task(self) -> str:
        return self.target.task

    @property
    def classes(self) -> list[str] | None:
        return self.target.classes

    @property
    def labelled(self) -> bool:
        return self.target.name is not None

    def store_attrs(self, source: dict[str, Any]) -> dict[str, Any]:
        """The attributes the store is created with."""
        return {
            "task": self.task,
            "classes": self.classes,
            "feature_names": self.feature_names,
            "encodings": self.encodings,
            "missing": self.missing,
            "source": source,
        }

    def final_attrs(self, xstats: RunningStats, ystats: RunningStats, class_counts: np.ndarray) -> dict[str, Any]:
        """The attributes known once every row is written: feature mean/std (the training
        store's under ``like=``), the target's kind, classes and counts or mean/std."""
        mean, std = self.training_stats or (xstats.mean.tolist(), xstats.std.tolist())
        t = self.target
        tattrs: dict[str, Any] = {"name": t.name, "kind": "string" if t.string_labels else "numeric"}
        if t.class_values is not None:
            tattrs["class_values"] = list(t.class_values)
        if t.task == "classification":
            if self.labelled:
                tattrs["class_counts"] = class_counts.tolist()
        else:
            lt = t.training or {}
            tattrs["mean"] = lt.get("mean", ystats.mean.tolist())
            tattrs["std"] = lt.get("std", ystats.std.tolist())
        out: dict[str, Any] = {"mean": mean, "std": std}
        if not self.labelled:
            out["labelled"] = False
        out["target"] = tattrs
        return out


# --------------------------------------------------------------------------------------------
# Decisions shared by tables and arrays
# --------------------------------------------------------------------------------------------


def class_names(values: Sequence[float]) -> list[str]:
    """Class names of numeric labels: ``1.0`` is ``"1"``, ``2.5`` stays ``"2.5"``."""
    return [str(int(v)) if float(v).is_integer() else str(v) for v in values]


def clean_label(label: str) -> str:
    """A string label without one trailing ``.`` (adult.test writes ``<=50K.``)."""
    return label[:-1] if label.endswith(".") else label


def infer_task(labels: LabelProfile) -> str:
    """Classification for string labels and for one integer label per row with at most
    :data:`MAX_CLASSES_INFERRED` distinct values; regression otherwise."""
    if labels.kind == "string":
        return "classification"
    if labels.scalar and labels.integral and labels.values is not None and len(labels.values) <= MAX_CLASSES_INFERRED:
        return "classification"
    return "regression"


def check_known_labels(labels: LabelProfile, string_labels: bool, training: Training) -> None:
    """Refuse labels that are not among the classes of the training store."""
    classes = training.classes or []
    if string_labels:
        unknown = sorted(set(labels.strings) - set(classes))
    else:
        known = set(training.target.get("class_values") or [])
        unknown = sorted(str(v) for v in (labels.values or {}) if v not in known)
    if unknown:
        raise IngestError(
            f"labels {unknown[:5]} are not among the classes of the training store {training.path!r} "
            f"({classes[:10]}); check --target or ingest the training data with every class"
        )


def decide_target(labels: LabelProfile, task: str | None, training: Training | None, name: str | None) -> TargetPlan:
    """Task, classes and label kind of a source (``name``: the target as the store records it,
    None for an unlabelled source). Under ``like=`` the training store's task and classes hold
    and labels it does not know are refused; otherwise the task is inferred unless given, and
    the classes are the sorted distinct labels (at least two)."""
    shape: tuple[int, ...] = ()
    if training is not None:
        if labels.kind_from_dtype:
            string_labels = labels.kind == "string"
            if string_labels and training.task != "classification":
                raise IngestError(
                    f"{labels.subject} holds strings but the training store {training.path!r} is a regression; "
                    "ingest labels of the same kind as the training data"
                )
        else:
            string_labels = training.target.get("kind") == "string"
        task = "classification" if labels.kind_from_dtype and string_labels else training.task
        if task == "regression" and labels.first_string is not None:
            r, v = labels.first_string
            raise IngestError(
                f"{labels.subject} has the non-numeric value {v!r} at {data_row(r)} but the training "
                f"store {training.path!r} is a regression; fix the value or leave the row out"
            )
        class_values = None if labels.kind_from_dtype and string_labels else training.target.get("class_values")
        if task == "classification":
            check_known_labels(labels, string_labels, training)
        return TargetPlan(name, task, string_labels, training.classes, class_values, shape, training.target)
    string_labels = labels.kind == "string"
    task = task or infer_task(labels)
    if task == "regression":
        if string_labels:
            r, v = labels.first_string or (0, "?")
            raise IngestError(
                f"{labels.subject} has the non-numeric value {v!r} at {data_row(r)} but the "
                "task is regression; pass --task classification or fix the value"
            )
        return TargetPlan(name, task, False, None, None, shape)
    class_values: list[float] | None = None
    if string_labels:
        classes = sorted(labels.strings)
    else:
        if not labels.scalar:
            raise IngestError("labels are not a 1-D array of class values; pass --task regression")
        if labels.values is None:
            raise IngestError(
                f"{labels.subject} has too many distinct values for classification; pass --task regression"
            )
        class_values = sorted(labels.values)
        classes = class_names(class_values)
    if len(classes) < 2:
        hint = f" ({labels.hint})" if not string_labels or not labels.kind_from_dtype else ""
        raise IngestError(
            f"{labels.subject} has a single class {classes[0] if classes else None!r}; "
            f"a classifier needs at least 2{hint}"
        )
    return TargetPlan(name, task, string_labels, classes, class_values, shape)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def big_integer_error(name: str, value: Any, fix: str | None = None) -> IngestError:
    """The refusal of an integer a float64 cannot hold exactly (Parquet, CSV, NumPy labels)."""
    return IngestError(
        f"column {name!r} holds the integer {value}, beyond 2^53, which a float64 cannot hold exactly "
        f"(an identifier?); {fix or f'leave it out with --drop {name}'}, or store it as a string"
    )


def resolve_column(spec: Any, names: list[str], what: str) -> str:
    """The column ``spec`` names: a name or a 0-based index (negative allowed); None is the last."""
    if spec is None:
        return names[-1]
    if isinstance(spec, str) and spec in names:
        return spec
    try:
        idx = int(spec)
    except (TypeError, ValueError):
        raise IngestError(
            f"{what} column {spec!r} not found; columns are: {', '.join(names[:30])}"
            + (" ..." if len(names) > 30 else "")
        ) from None
    if not -len(names) <= idx < len(names):
        raise IngestError(f"{what} column index {idx} out of range; the source has {len(names)} columns (0-based)")
    return names[idx]


def _numeric_encodings(training: Training, names: list[str], src: str) -> list[dict[str, Any]]:
    """Encodings for a training store that has none (made by ``synth`` or from NumPy arrays):
    its features, found by name among the source's columns, are numeric, imputed with the
    training means."""
    feats = training.feature_names
    absent = [f for f in feats if f not in names]
    if absent:
        raise IngestError(
            f"the training store {training.path!r} was not ingested from a table (no column encodings) and its "
            f"features {absent[:5]} are not columns of {src!r}; name the source's feature columns "
            f"{', '.join(feats[:3])}{' ...' if len(feats) > 3 else ''}, or ingest the training data from a table too"
        )
    return [{"name": f, "kind": "numeric", "fill": float(m)} for f, m in zip(feats, training.mean, strict=True)]


@dataclass
class Columns:
    """The columns of a table ingest reads: features, the target (None: unlabelled) and, under
    ``like=``, the training store's encodings of the features."""

    features: list[str]
    target: str | None
    encodings: list[dict[str, Any]] | None = None

    @property
    def read(self) -> list[str]:
        return [*self.features, *([self.target] if self.target is not None else [])]


def select_columns(
    names: list[str],
    *,
    target: Any,
    drop: Sequence[Any],
    training: Training | None,
    unlabelled: bool,
    src: str,
    layout: str = "",
) -> Columns:
    """The feature and target columns among ``names`` (``layout``: the CSV delimiter, as
    errors show it)."""
    in_layout = f" with the {layout}" if layout else ""
    tcol: str | None
    if training is not None:
        if unlabelled:
            tcol = None
        else:
            try:
                tcol = resolve_column(target if target is not None else training.target.get("name"), names, "target")
            except IngestError as exc:
                raise IngestError(f"{exc} (for data without targets, pass --unlabelled)") from None
        encs = [dict(e) for e in training.encodings] or _numeric_encodings(training, names, src)
        feats = [e["name"] for e in encs]
        absent = [f for f in feats if f not in names]
        if absent:
            raise IngestError(
                f"columns {absent[:5]} of the training store {training.path!r} are not in {src!r}{in_layout}; "
                "ingest a source with the same columns"
            )
        return Columns(feats, tcol, encs)
    dropped = {resolve_column(d, names, "--drop") for d in drop}
    if target is None:  # the last column that is not dropped
        kept = [n for n in names if n not in dropped]
        if not kept:
            raise IngestError(f"--drop leaves no columns of {src!r}; keep a target and a feature")
        tcol = kept[-1]
    else:
        tcol = resolve_column(target, names, "target")
        if tcol in dropped:
            raise IngestError(f"column {tcol!r} is both --target and --drop; pass it to one of them")
    feats = [n for n in names if n != tcol and n not in dropped]
    if not feats:
        raise IngestError(
            f"no feature columns left after --target/--drop: {src!r} has {len(names)} column(s) "
            f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}){in_layout}; keep at least one feature"
            + (", or pass --delimiter" if layout else "")
        )
    return Columns(feats, tcol)


_LEADING_ZERO = re.compile(r"[+-]?0\d")

# an amount a spreadsheet or shop export formats: "$1,234.50", "€12", "12,50 €", "12.5%", "USD 7",
# "(1,234.00)" (an accounting negative), "-$5"; a column of them is numbers, not categories
_UNITS = r"[$€£¥₹%]|(?:USD|EUR|GBP|CHF|JPY|CAD|AUD)\b"
_AMOUNT = re.compile(rf"[+-]?\(?[+-]?(?:{_UNITS})?\s*[+-]?\d(?:[\d,.' \u00a0\u202f]*\d)?\s*(?:{_UNITS})?\)?")
_MARKED = re.compile(rf"{_UNITS}|^[+-]?\(.*\)$")


_DATE = re.compile(r"\d{4}-\d\d-\d\d|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}(?!\d)")  # 2024-01-05, 05.01.2024, 1/5/24


def formatted_amounts(texts: Collection[str]) -> bool:
    """Whether every text is a number written with a currency or percent sign or in accounting
    parentheses, some with one: what a column of prices, balances or rates exported as text holds."""
    return any(_MARKED.search(t) for t in texts) and all(_AMOUNT.fullmatch(t) for t in texts)


def labels_need_text(texts: Sequence[str]) -> bool:
    """Whether numeric-looking labels lose information as numbers: a leading zero (``007``,
    ``01``: codes) or two texts of the same number (``7`` and ``007``, ``1`` and ``1.0``)."""
    seen: set[float] = set()
    for t in texts:
        if _LEADING_ZERO.match(t):
            return True
        try:
            v = float(t.replace(",", ""))
        except ValueError:
            continue
        if v in seen:
            return True
        seen.add(v)
    return False


def table_labels(tp: _ColumnProfile, classify: bool = False) -> LabelProfile:
    """The labels of a table's target column, from its profile. ``classify``: the labels are
    classes, so numbers whose text does not round-trip (:func:`labels_need_text`) stay text."""
    strings: dict[str, int] = {}
    for k, v in {**tp.nonnum_counts, **(tp.num_str_counts or {})}.items():
        k2 = clean_label(k)
        strings[k2] = strings.get(k2, 0) + v
    as_text = tp.n_nonnum > 0 or (classify and labels_need_text(list(tp.num_str_counts or {})))
    return LabelProfile(
        kind="string" if as_text else "numeric",
        strings=strings,
        values=tp.num_counts,
        integral=tp.integral,
        first_string=tp.first_nonnum,
        subject=f"target column {tp.name!r}",
        hint="check --target, or pass --task regression",
    )


def _missing_values_hint(features: Sequence[str], profiles: dict[str, _ColumnProfile]) -> str:
    """The ``--missing-values`` that would mark missing every text found in the numeric columns
    (a spreadsheet's error values ``#N/A``, ``#DIV/0!``): the default list's ``?`` and ``NA`` and
    them, so that one rerun does; "" when they are many or do not fit in the option's list."""
    texts = sorted({t for c in features for t in profiles[c].nonnum_counts if profiles[c].n_num > profiles[c].n_nonnum})
    if not texts or len(texts) > 10 or any(re.search(r"[,'\s]", t) for t in texts):
        return ""
    return f", or pass --missing-values '?,NA,{','.join(texts)}'"


def _not_categories(c: str, pr: _ColumnProfile) -> tuple[str, str] | None:
    """Whether a text column that ``encoding="auto"`` would make categories of is none, and why:
    ``("amounts", example)`` for amounts with a currency or percent sign (their codes would order
    ``$10`` before ``$9``), ``("identifier", counts)`` for an identifier (most of its many values
    distinct); None for categories. An explicit ``--encoding`` keeps them as categories."""
    texts = pr.nonnum_counts
    if texts and formatted_amounts(texts):
        r, v = pr.first_nonnum
        return "amounts", f"{v!r} at {data_row(r)}"
    distinct = len(texts) + len(pr.num_str_counts or {})
    if distinct > IDENTIFIER_MIN_DISTINCT and 2 * distinct > pr.n_num + pr.n_nonnum:
        dates = pr.first_nonnum is not None and _DATE.match(pr.first_nonnum[1])
        kind = f"; dates such as {pr.first_nonnum[1]!r}, which are not read as numbers" if dates else ""
        return "identifier", f"{distinct:,} distinct values in {pr.n_num + pr.n_nonnum:,} rows{kind}"
    return None


def _refuse_non_categories(found: dict[str, tuple[str, str]]) -> None:
    """One error naming every column :func:`_not_categories` found, amounts first, and the --drop
    options that leave them out."""
    for kind in ("amounts", "identifier"):
        cols = {c: why for c, (k, why) in found.items() if k == kind}
        if not cols:
            continue
        named = ", ".join(f"{c!r} ({why})" for c, why in list(cols.items())[:5]) + (" ..." if len(cols) > 5 else "")
        drops = " ".join(f"--drop {shlex.quote(c)}" for c in cols)  # "Order ID" as the shell takes it
        s = "s" if len(cols) > 1 else ""
        if kind == "amounts":
            raise IngestError(
                f"column{s} {named} hold{'' if s else 's'} amounts with a currency or percent sign or in "
                "parentheses, which would be read as categories, not numbers; write them as plain numbers "
                f"(e.g. -1234.50, or 0.125 for 12.5%), or leave {'them' if s else 'it'} out with {drops} "
                "(--encoding onehot keeps such columns as categories)"
            )
        raise IngestError(
            f"column{s} {named} look{'' if s else 's'} like an identifier, e-mail or free text, whose category "
            f"codes would tell rows apart rather than generalize; leave {'them' if s else 'it'} out with {drops}, "
            "or pass --encoding ordinal to keep such columns as categories"
        )


def plan_table(
    columns: Columns,
    profiles: dict[str, _ColumnProfile],
    *,
    n_out: int,
    task: str | None,
    encoding: str,
    missing: str,
    training: Training | None,
    chunk_rows: int | None,
) -> IngestPlan:
    """The plan of a table from its column profiles: numeric or categorical columns (one-hot up
    to :data:`ONEHOT_MAX` categories under ``encoding="auto"``), imputation values, the target,
    and uint8 features when every one is an integer in 0..255 that needs no fractional fill."""
    if n_out == 0:
        raise IngestError("every row has a missing value; use --missing impute")
    encodings = [dict(e) for e in columns.encodings or []]
    given = {e["name"]: e for e in encodings}  # a dict: a search of the list per column is quadratic in width
    not_categories: dict[str, tuple[str, str]] = {}  # text columns "auto" would wrongly make categories of
    for c in columns.features:
        pr = profiles[c]
        enc = given.get(c)
        numeric_expected = enc["kind"] == "numeric" if enc else (pr.n_nonnum == 0 or pr.n_num > pr.n_nonnum)
        if numeric_expected and pr.n_nonnum:
            r, v = pr.first_nonnum
            if formatted_amounts(pr.nonnum_counts):  # "$1,300" among plain numbers: no missing-value text
                raise IngestError(
                    f"column {c!r} is numeric but has {pr.n_nonnum:,} value(s) written with a currency or percent "
                    f"sign or in parentheses ({v!r} at {data_row(r)}); write them as plain numbers (e.g. -1234.50, "
                    "or 0.125 for 12.5%)"
                )
            raise IngestError(
                f"column {c!r} is numeric but has the non-numeric value {v!r} at {data_row(r)}; "
                "fix the value or mark it missing (empty, ?, NA)"
                + ("" if training is not None else _missing_values_hint(columns.features, profiles))
            )
        if numeric_expected and pr.first_big is not None:
            raise big_integer_error(c, pr.first_big[1])
        if not numeric_expected and enc is None and encoding == "auto":
            why = _not_categories(c, pr)
            if why is not None:
                not_categories[c] = why
        if not numeric_expected and enc is None and pr.n_thousands:
            (r, v), (r2, v2) = pr.first_thousands, pr.first_nonnum
            raise IngestError(
                f"column {c!r} holds numbers with thousands separators ({v!r} at data row {r}) and text that is "
                f"not a number ({v2!r} at data row {r2}); remove the separators or fix the values (mark missing "
                f"ones empty), or leave the column out with --drop {c}"
            )
        if missing == "reject" and pr.n_missing:
            r, v = pr.first_missing
            raise IngestError(
                f"column {c!r} has a missing or infinite value ({v!r}) at {data_row(r)} and "
                "--missing reject was given; fix the data or use --missing impute/drop"
            )
        if enc is not None:
            continue
        if numeric_expected:
            encodings.append({"name": c, "kind": "numeric", "fill": pr.mean})
        else:
            counts = dict(pr.nonnum_counts)
            if pr.n_num:
                if pr.num_str_counts is None:
                    raise IngestError(f"column {c!r} mixes numbers and strings with too many values; clean it up")
                for k, v in pr.num_str_counts.items():
                    counts[k] = counts.get(k, 0) + v
            cats = sorted(counts)
            kind = encoding if encoding != "auto" else ("onehot" if len(cats) <= ONEHOT_MAX else "ordinal")
            fill = max(cats, key=lambda k: (counts[k], k))
            encodings.append({"name": c, "kind": kind, "categories": cats, "fill": fill})
    _refuse_non_categories(not_categories)
    feature_names: list[str] = []
    for e in encodings:
        e["offset"] = len(feature_names)
        if e["kind"] == "onehot":
            feature_names += [f"{e['name']}={k}" for k in e["categories"]]
        else:
            feature_names.append(e["name"])

    tcol = columns.target
    if tcol is not None:
        tp = profiles[tcol]
        if tp.n_missing and missing != "drop":
            r, v = tp.first_missing
            raise IngestError(
                f"target column {tcol!r} is missing ({v!r}) at {data_row(r)}; fix it or pass --missing drop"
            )
        if (
            tp.first_big is not None
            and tp.n_nonnum == 0
            and not (training is not None and training.target.get("kind") == "string")
        ):
            raise big_integer_error(tcol, tp.first_big[1], "check --target")
        numeric = table_labels(tp)
        classify = (
            training is None
            and numeric.kind == "numeric"
            and (task == "classification" or (task is None and infer_task(numeric) == "classification"))
        )
        labels = table_labels(tp, classify=classify)
    else:  # unlabelled, like=: the training store's classes; y holds zeros
        labels = LabelProfile("numeric", subject="the target")
    target = decide_target(labels, task if training is None else None, training, tcol)

    compact = True
    for e in encodings:
        if e["kind"] == "numeric":
            pr = profiles[e["name"]]
            if not (pr.integral and pr.minimum >= 0 and pr.maximum <= 255) or (pr.n_missing and missing == "impute"):
                compact = False
        elif e["kind"] == "ordinal" and len(e["categories"]) > 256:
            compact = False
    x_dtype = np.dtype(np.uint8 if compact else np.float32)
    default_rows = default_chunk_rows(len(feature_names) * x_dtype.itemsize, n_out)
    # a chunk larger than the data and the default would only allocate memory (--chunk-rows 1e11)
    chunk_rows = default_rows if chunk_rows is None else min(chunk_rows, max(default_rows, n_out))
    return IngestPlan(
        feature_names,
        encodings,
        target,
        x_dtype,
        chunk_rows,
        missing,
        n_out,
        training_stats=(training.mean, training.std) if training is not None else None,
    )


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------


@dataclass
class ArrayProfile:
    """What pass 1 saw of NumPy/IDX arrays: per-feature sums of the finite values, rows with a
    missing or infinite feature, and the labels."""

    x_dtype: np.dtype  # the source's feature dtype
    total: np.ndarray
    count: np.ndarray
    rows_with_missing: int
    rows: int  # rows read
    labels: LabelProfile
    y_shape: tuple[int, ...] = ()  # per-row shape of the labels
    target_name: str = "labels"  # "labels", or "x{j}" for a column of the features


def plan_arrays(
    profile: ArrayProfile,
    *,
    task: str | None,
    missing: str,
    training: Training | None,
    chunk_rows: int | None,
) -> IngestPlan:
    """The plan of arrays: the target, imputation means, and the source's compact feature dtype
    (bool -> uint8, integers of at most 16 bits kept, else float32)."""
    target = decide_target(profile.labels, task if training is None else None, training, profile.target_name)
    target.shape = profile.y_shape
    n_features = len(profile.total)
    fill = np.where(profile.count > 0, profile.total / np.maximum(profile.count, 1), 0.0)
    src_dt = profile.x_dtype.newbyteorder("=") if profile.x_dtype.byteorder == ">" else profile.x_dtype
    if src_dt.kind == "b":
        x_dtype = np.dtype(np.uint8)
    elif src_dt.kind in "ui" and src_dt.itemsize <= 2:
        x_dtype = src_dt
    else:
        x_dtype = np.dtype(np.float32)
    n_out = profile.rows - (profile.rows_with_missing if missing == "drop" else 0)
    default_rows = default_chunk_rows(n_features * x_dtype.itemsize, n_out)
    # a chunk larger than the data and the default would only allocate memory (--chunk-rows 1e11)
    chunk_rows = default_rows if chunk_rows is None else min(chunk_rows, max(default_rows, n_out))
    return IngestPlan(
        [f"x{i}" for i in range(n_features)],
        [],
        target,
        x_dtype,
        chunk_rows,
        missing,
        n_out,
        training_stats=(training.mean, training.std) if training is not None else None,
        fill=fill,
    )
