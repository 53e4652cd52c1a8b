"""The prepare stage on a locally built MathVista-schema dataset: bad rows, leaks, determinism, lengths."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import random
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from pipeline import images, prompt_tokens, row_values, splits
from pipeline import prepare as prep
from pipeline.params import ModelParams, ParamsError, parse_params

# one pytest-xdist worker runs this module's tests: they share its expensive module fixtures
pytestmark = pytest.mark.xdist_group("prepare")

REPO = Path(__file__).resolve().parents[1]
SEED = 42
EVAL_FRACTION = 0.2
FACTOR, MIN_PIXELS, MAX_PIXELS = 28, 3136, 50176  # a small budget keeps the suite fast
OUTPUT_COLUMNS = ["id", "prompt", "image", "question", "answer", "choices", "question_type", "answer_type",
                  "precision", "unit", "category", "context", "grade", "language", "skills", "source", "task"]
EXPECTED_DROPS = {
    "answer_not_in_choices": 1, "duplicate_id": 1, "duplicate_of_eval_row": 1, "empty_question": 1,
    "extreme_aspect_ratio": 1, "missing_answer": 1, "missing_image": 1, "question_type_mismatch": 1,
    "unparseable_precision": 2, "unreadable_image": 2,
}


def _committed_params() -> dict:
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], capture_output=True, text=True, cwd=REPO)
    return yaml.safe_load(shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text())


SHIPPED = _committed_params()


def make_params(source, **settings):
    """The committed params with dotted keys set (created if the committed file predates them)."""
    raw = copy.deepcopy(SHIPPED)
    defaults = {"run_id": "t", "seed": SEED, "data.source": str(source), "data.split": "train",
                "data.eval_fraction": EVAL_FRACTION, "data.num_proc": 2, "model.name_or_path": "no/such-model",
                "model.image_factor": FACTOR, "model.min_pixels": MIN_PIXELS, "model.max_pixels": MAX_PIXELS}
    for key, value in {**defaults, **settings}.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_params(raw)


# ---------------------------------------------------------------------------------------------
# a MathVista-schema fixture
# ---------------------------------------------------------------------------------------------
def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _picture(rng: random.Random, size=None) -> Image.Image:
    size = size or (rng.randint(40, 160), rng.randint(40, 160))
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        draw.rectangle((x, y, x + 12, y + 12), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def _answer_fields(rng: random.Random, kind: int) -> dict:
    none = dict(choices=None, precision=None, unit=None, question_type="free_form")
    if kind == 0:
        choices = rng.sample(["red", "green", "blue", "orange", "purple"], k=rng.randint(3, 5))
        return dict(none, answer=rng.choice(choices), choices=choices, question_type="multi_choice",
                    answer_type="text")
    if kind == 1:
        return dict(none, answer=str(rng.randint(0, 99)), answer_type="integer", unit=rng.choice([None, "cm"]))
    if kind == 2:
        return dict(none, answer=f"{rng.uniform(0, 9):.1f}", answer_type="float", precision=1.0)
    if kind == 3:
        return dict(none, answer=f"{rng.uniform(0, 9):.2f}", answer_type="float", precision=2.0, unit="m")
    if kind == 4:
        return dict(none, answer=str(rng.sample(range(10), k=3)), answer_type="list")
    return dict(none, answer=rng.choice(["left", "right"]), answer_type="text")


def mathvista_row(pid: str, question: str, image, **fields) -> dict:
    image_value = None if image is None else {"bytes": image if isinstance(image, bytes) else _encode(image),
                                              "path": None}
    row = {"pid": pid, "question": question, "image": f"images/{pid}.png", "decoded_image": image_value,
           "choices": None, "unit": None, "precision": None, "answer": None, "question_type": "free_form",
           "answer_type": "text", "query": question,
           "metadata": {"category": "math-targeted-vqa", "context": "synthetic", "grade": "high school",
                        "img_height": 0, "img_width": 0, "language": "english",
                        "skills": ["arithmetic reasoning", "statistical reasoning"], "source": "fixture",
                        "split": "testmini", "task": "figure question answering"}}
    row.update(fields)
    return row


def good_rows(count: int, seed: int, prefix: str = "", long_every: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        question = f"Question {prefix}{i}: what does the picture show?"
        if long_every and i % long_every == 0:
            question += " Consider every detail of the figure carefully." * 30
        picture = _picture(rng)
        image = _encode(picture, "JPEG", quality=90) if i % 3 == 0 else _encode(picture)
        rows.append(mathvista_row(f"{prefix}{i + 1}", question, image, **_answer_fields(rng, i % 6)))
    return rows


def _ids_in_different_splits() -> tuple[str, str]:
    ids = [f"twin-{i}" for i in range(100)]
    train = next(i for i in ids if splits.split_of(i, SEED, EVAL_FRACTION) == "train")
    held_out = next(i for i in ids if splits.split_of(i, SEED, EVAL_FRACTION) == "eval")
    return train, held_out


def special_rows() -> list[dict]:
    """The odd cases MathVista (or a broken copy of it) can hold, each with a telling id."""
    rng = random.Random(7)
    png = _encode(_picture(rng))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated to portrait
    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    text = dict(answer="7", answer_type="integer")
    twin_train, twin_eval = _ids_in_different_splits()
    twin_image = _encode(_picture(rng))
    return [
        mathvista_row("bad-corrupt", "How many?", b"this is not an image", **text),
        mathvista_row("bad-truncated", "How many?", png[: len(png) // 2], **text),
        mathvista_row("bad-no-image", "How many?", None, **text),
        mathvista_row("bad-no-answer", "How many?", png, answer=None, answer_type="integer"),
        mathvista_row("bad-empty-question", "   ", png, **text),
        mathvista_row("bad-not-in-choices", "Which?", png, answer="pink", choices=["red", "blue"],
                      question_type="multi_choice"),
        mathvista_row("bad-precision-fraction", "How long?", png, answer="1.5", answer_type="float", precision=1.5),
        mathvista_row("bad-precision-negative", "How long?", png, answer="1.5", answer_type="float", precision=-1.0),
        mathvista_row("bad-aspect", "How many?", _encode(Image.new("RGB", (900, 6), "white")), **text),
        mathvista_row("bad-type", "Which?", png, answer="red", question_type="multi_choice"),
        mathvista_row("1", "A second row reusing id 1", png, **text),
        mathvista_row("letter", "Which colour?", png, answer="B", choices=["red", "blue", "green"],
                      question_type="multi_choice"),
        mathvista_row("exif", "How many?", _encode(_picture(rng, (120, 60)), "JPEG", exif=exif), **text),
        mathvista_row("rgba", "How many?", _encode(rgba), **text),
        mathvista_row(twin_train, "Which twin?", twin_image, **text),
        mathvista_row(twin_eval, "Which twin?", twin_image, **text),
    ]


def write_mathvista(path: Path, rows: list[dict]) -> Path:
    from datasets import Dataset

    from pipeline import synthetic

    columns = {name: [row[name] for row in rows] for name in rows[0]}
    Dataset.from_dict(columns, features=synthetic.features()).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def fixture_source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mathvista") / "testmini.parquet"
    return write_mathvista(path, good_rows(180, seed=0) + special_rows())


@pytest.fixture(scope="module")
def prepared(fixture_source, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "data"
    return out, prep.prepare(make_params(fixture_source, **{"data.num_proc": 2}), out)


def load_split(out: Path, split: str):
    from datasets import load_dataset

    return load_dataset("parquet", data_files=str(out / f"{split}.parquet"), split="train")


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_bad_rows_are_dropped_and_counted_by_reason(prepared):
    _, report = prepared
    assert report["dropped"] == EXPECTED_DROPS
    examples = report["dropped_examples"]
    assert examples["unreadable_image"] == ["bad-corrupt", "bad-truncated"]
    assert examples["missing_image"] == ["bad-no-image"] and examples["missing_answer"] == ["bad-no-answer"]
    assert examples["duplicate_id"] == ["1"] and examples["extreme_aspect_ratio"] == ["bad-aspect"]
    assert report["rows_in"] == 196
    assert report["rows_kept"] == report["train_rows"] + report["eval_rows"] == 196 - sum(EXPECTED_DROPS.values())
    assert report["prompt_tokens"]["method"] == "utf8_upper_bound"  # no tokenizer for no/such-model


def test_output_schema_prompts_and_images(prepared):
    from datasets import Image as ImageFeature

    out, _ = prepared
    rows = {}
    for split in ("train", "eval"):
        dataset = load_split(out, split)
        assert dataset.column_names == OUTPUT_COLUMNS
        assert isinstance(dataset.features["image"], ImageFeature)
        rows.update({row["id"]: row for row in dataset})
    for row in rows.values():
        width, height = row["image"].size
        assert row["image"].mode == "RGB" and width % FACTOR == 0 and height % FACTOR == 0
        assert MIN_PIXELS <= width * height <= MAX_PIXELS
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert row["prompt"][1]["content"].startswith(row["question"])
        assert row["skills"] == "arithmetic reasoning, statistical reasoning" and row["category"]
        if row["choices"]:
            assert row["answer"] in row["choices"] and row["question_type"] == "multi_choice"
            assert "(A) " + row["choices"][0] in row["prompt"][1]["content"]
    types = {row["answer_type"] for row in rows.values()}
    assert types == {"integer", "float", "list", "text"}
    assert rows["letter"]["answer"] == "blue"  # a letter answer becomes the option's text, as in MathVista
    assert rows["exif"]["image"].size == (56, 112)  # EXIF rotation applied before resizing
    assert rows["rgba"]["image"].getpixel((5, 5)) == (255, 255, 255)  # transparency flattened onto white
    floats = [r for r in rows.values() if r["precision"] == 2.0]
    assert floats and all("2 decimal places" in r["prompt"][1]["content"] for r in floats)
    with_unit = [r for r in rows.values() if r["unit"] == "cm"]
    assert with_unit and all("in cm" in r["prompt"][1]["content"] for r in with_unit)


def test_split_has_no_leak_and_follows_the_id_hash(prepared):
    out, report = prepared
    train, held_out = (load_split(out, split) for split in ("train", "eval"))
    assert not set(train["id"]) & set(held_out["id"])
    assert all(splits.split_of(i, SEED, EVAL_FRACTION) == "train" for i in train["id"])
    assert all(splits.split_of(i, SEED, EVAL_FRACTION) == "eval" for i in held_out["id"])
    twin_train, twin_eval = _ids_in_different_splits()
    assert twin_eval in held_out["id"] and twin_train not in train["id"]
    assert report["dropped_examples"]["duplicate_of_eval_row"] == [twin_train]
    assert len(held_out) > 0.1 * report["rows_kept"]


def test_output_bytes_do_not_depend_on_num_proc(prepared, fixture_source, tmp_path):
    out, report = prepared
    again = prep.prepare(make_params(fixture_source, **{"data.num_proc": 1}), tmp_path / "data")
    assert again["sha256"] == report["sha256"]
    for split in ("train", "eval"):
        assert (tmp_path / "data" / f"{split}.parquet").read_bytes() == (out / f"{split}.parquet").read_bytes()
        assert hashlib.sha256((out / f"{split}.parquet").read_bytes()).hexdigest() == report["sha256"][
            f"{split}.parquet"]


def test_length_filter_with_the_models_tokenizer(tiny_model_dir, tmp_path):
    """Exact counts from the tokenizer (checked against the processor) decide which rows are too long."""
    from pipeline import modeling

    source = write_mathvista(tmp_path / "long.parquet", good_rows(40, seed=3, long_every=4))
    settings = {"model.name_or_path": str(tiny_model_dir), "model.image_factor": 16, "model.min_pixels": 1024,
                "model.max_pixels": 16384, "train.max_completion_length": 32, "model.max_model_len": 32 + 400,
                "data.num_proc": 1}
    report = prep.prepare(make_params(source, **settings), tmp_path / "data")
    assert report["prompt_tokens"]["method"] == "tokenizer"
    assert report["dropped"] == {"prompt_too_long": 10}
    assert report["prompt_tokens"]["max"] <= report["prompt_tokens"]["budget"] == 400

    processor = modeling.load_processor(str(tiny_model_dir))
    counter = prompt_tokens.PromptTokenCounter(make_params(source, **settings).model)
    upper = prompt_tokens.PromptTokenCounter(ModelParams(name_or_path=str(tmp_path / "no-model")))
    for row in load_split(tmp_path / "data", "train").select(range(6)):
        messages = [dict(m) for m in row["prompt"]]
        messages[1]["content"] = [{"type": "image"}, {"type": "text", "text": messages[1]["content"]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        actual = len(processor(text=[text], images=[row["image"]])["input_ids"][0])
        image_tokens = (row["image"].size[0] // 16) * (row["image"].size[1] // 16)
        assert counter.count([row["prompt"]], [image_tokens]) == [actual]
        assert upper.count([row["prompt"]], [image_tokens])[0] >= actual


def test_separate_eval_source_and_id_collisions(tmp_path):
    train_source = write_mathvista(tmp_path / "train.parquet", good_rows(30, seed=1, prefix="tr"))
    eval_source = write_mathvista(tmp_path / "eval.parquet", good_rows(12, seed=2, prefix="ev"))
    eval_settings = {"data.eval_source": {"source": str(eval_source), "split": "testmini"}}
    report = prep.prepare(make_params(train_source, **eval_settings), tmp_path / "data")
    assert (report["train_rows"], report["eval_rows"]) == (30, 12) and report["split"] == "eval_source"
    assert set(load_split(tmp_path / "data", "eval")["id"]) == {f"ev{i}" for i in range(1, 13)}

    clashing = write_mathvista(tmp_path / "clash.parquet", good_rows(5, seed=4, prefix="tr"))
    clash_settings = {"data.eval_source": {"source": str(clashing), "split": "testmini"}}
    with pytest.raises(prep.PrepareError, match=r"appear in both .*'tr1'"):
        prep.prepare(make_params(train_source, **clash_settings), tmp_path / "clash")


def test_repeated_options_are_kept_for_evaluation_and_dropped_for_training(tmp_path):
    """MathVista testmini repeats an option's text in a few rows; a benchmark score must count them."""
    rng = random.Random(3)
    repeated = dict(answer="6", choices=["4", "6", "6", "8"], question_type="multi_choice", answer_type="integer")

    def with_repeats(prefix: str) -> list[dict]:
        return [*good_rows(10, seed=5, prefix=prefix),
                mathvista_row(f"{prefix}-repeat", "How many squares?", _encode(_picture(rng)), **repeated)]

    train_source = write_mathvista(tmp_path / "train.parquet", with_repeats("tr"))
    eval_source = write_mathvista(tmp_path / "eval.parquet", with_repeats("ev"))
    settings = {"data.eval_source": {"source": str(eval_source), "split": "testmini"}}
    report = prep.prepare(make_params(train_source, **settings), tmp_path / "data")
    assert report["dropped"] == {"duplicate_choices": 1} and report["dropped_examples"] == {
        "duplicate_choices": ["tr-repeat"]}
    assert (report["train_rows"], report["eval_rows"]) == (10, 11)
    evaluation = load_split(tmp_path / "data", "eval")
    row = next(r for r in evaluation if r["id"] == "ev-repeat")
    assert row["choices"] == ["4", "6", "6", "8"] and row["answer"] == "6"
    assert "train_drop_reason" not in evaluation.column_names


def test_uniform_size_letterboxes_every_image(fixture_source, tmp_path):
    params = make_params(fixture_source, **{"data.uniform_size": [112, 84], "data.max_rows": 40})
    report = prep.prepare(params, tmp_path / "data")
    assert report["image_tokens"]["min"] == report["image_tokens"]["max"] == 4 * 3
    assert {row["image"].size for row in load_split(tmp_path / "data", "train")} == {(112, 84)}
    with pytest.raises(prep.PrepareError, match="multiples of model.image_factor"):
        prep.prepare(make_params(fixture_source, **{"data.uniform_size": [100, 84]}), tmp_path / "bad")


def test_zero_usable_rows_is_a_clear_error_and_a_failed_stage(tmp_path, monkeypatch):
    source = write_mathvista(tmp_path / "bad.parquet", special_rows()[:5])
    with pytest.raises(prep.PrepareError, match="no usable rows.*unreadable_image"):
        prep.prepare(make_params(source), tmp_path / "data")
    raw = copy.deepcopy(SHIPPED)
    raw["data"].update(source=str(source), split="train")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        prep.main()
    assert "prepare: error: no usable rows" in str(exit_info.value.code)  # a message: exit status 1
    assert not (tmp_path / "reports" / "data_report.json").exists()


def test_json_and_image_folder_sources_through_a_column_map(tmp_path):
    rng = random.Random(5)
    folder = tmp_path / "folder"
    (folder / "pics").mkdir(parents=True)
    records = []
    for i in range(24):
        _picture(rng).save(folder / "pics" / f"{i}.png")
        records.append({"file_name": f"pics/{i}.png", "prompt_text": f"Count the squares ({i}).", "gold": i % 4,
                        "options": None, "decimals": "two" if i == 0 else None, "topic": ["geometry", "count"]})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    # json rows name their pictures relative to the json file's folder
    rows = [dict(r, file_name=f"folder/{r['file_name']}") for r in records]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    columns = {"id": None, "question": "prompt_text", "image": "file_name", "answer": "gold", "choices": "options",
               "precision": "decimals", "skills": "topic"}
    report = prep.prepare(make_params(tmp_path / "rows.jsonl", **{"data.columns": columns}), tmp_path / "json")
    assert report["dropped"] == {"unparseable_precision": 1} and report["rows_kept"] == 23
    # a single file is its own one split: data.split ("train" here) played no part in reading it
    assert report["sources"] == {"all": {"source": str(tmp_path / "rows.jsonl"), "format": "json", "config": None,
                                         "split": None, "revision": None, "rows": 24}}
    row = load_split(tmp_path / "json", "train")[0]
    assert len(row["id"]) == 16 and row["answer_type"] == "integer" and row["skills"] == "geometry, count"

    # the same rows as CSV: lists arrive as text, and every column's values as CSV types them
    import csv

    with (tmp_path / "rows.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "topic": json.dumps(r["topic"])} for r in rows)
    report = prep.prepare(make_params(tmp_path / "rows.csv", **{"data.columns": columns}), tmp_path / "csv")
    assert report["rows_kept"] == 23 and report["sources"]["all"]["format"] == "csv"
    csv_row = load_split(tmp_path / "csv", "train")[0]
    assert {k: v for k, v in csv_row.items() if v != row[k]} == {}, row

    folder_columns = dict(columns, image="image")
    params = make_params(folder, **{"data.format": "imagefolder", "data.columns": folder_columns})
    report = prep.prepare(params, tmp_path / "folder-out")
    assert report["rows_kept"] == 23 and report["dropped"] == {"unparseable_precision": 1}
    assert report["sources"]["all"]["split"] == "train"  # a folder is read by split


def test_missing_columns_and_sources_fail_clearly(fixture_source, tmp_path):
    with pytest.raises(prep.PrepareError, match=r"column\(s\) not found: question → 'prompt_text'"):
        prep.prepare(make_params(fixture_source, **{"data.columns.question": "prompt_text"}), tmp_path / "a")
    with pytest.raises(prep.PrepareError, match=r"'AI4Math/NoSuchDataset-xyz' \(format hub, split 'testmini', "
                                                 r"revision 'main'\) cannot be loaded here"):
        prep.prepare(make_params("AI4Math/NoSuchDataset-xyz", **{"data.split": "testmini"}), tmp_path / "b")
    with pytest.raises(ParamsError, match="data.columns.questoin: unknown key"):
        make_params(fixture_source, **{"data.columns.questoin": "q"})


def test_embedded_demo_dataset_goes_through_the_same_code(embedded_root, tmp_path):
    preset = yaml.safe_load((REPO / "presets" / "demo.yaml").read_text())
    settings = {key: (str(REPO / value) if key in ("data.source", "model.name_or_path") else value)
                for key, value in preset.items() if key.split(".")[0] in ("model", "data", "train")}
    settings.update({"data.split": "testmini"})
    report = prep.prepare(make_params(settings.pop("data.source"), **settings), tmp_path / "data")
    assert report["rows_in"] == report["rows_kept"] == 240 and report["dropped"] == {}
    assert report["prompt_tokens"]["method"] == "tokenizer"
    assert report["prompt_tokens"]["max"] + preset["train.max_completion_length"] <= preset["model.max_model_len"]


@pytest.mark.parametrize(("value", "expected"), [
    (3, "3"), (2.0, "2"), (2.5, "2.5"), ("  blue ", "blue"), ([1, 2, 3], "[1, 2, 3]"), (True, "True"),
])
def test_answers_are_normalised_to_the_text_scoring_reads(value, expected):
    assert row_values.clean_gold_answer(value) == expected


@pytest.mark.parametrize("value", [None, float("nan"), "  ", []])
def test_missing_answers_are_bad_rows(value):
    with pytest.raises(prep.BadRow, match="missing_answer"):
        row_values.clean_gold_answer(value)


def test_choices_precision_and_shapes():
    assert row_values.clean_choices('["a", "b"]') == ["a", "b"] and row_values.clean_choices(None) is None
    assert row_values.match_choice("(b)", ["x", "y"]) == "y" and row_values.match_choice(" Y ", ["x", "y"]) == "y"
    assert row_values.clean_precision("2") == 2.0 and row_values.clean_precision(None) is None
    rules = images.ImageRules(FACTOR, MIN_PIXELS, MAX_PIXELS, max_aspect_ratio=50.0)
    for call, reason in [(lambda: row_values.clean_choices("a or b"), "unparseable_choices"),
                         (lambda: row_values.clean_precision(float("inf")), "unparseable_precision")]:
        with pytest.raises(prep.BadRow, match=reason):
            call()
    for call, reason in [(lambda: images.check_shape(0, 10, rules), "zero_size_image"),
                         (lambda: images.check_shape(10, 600, rules), "extreme_aspect_ratio")]:
        with pytest.raises(images.BadImage, match=reason):
            call()


def test_geometry3k_schema_through_the_leaderboard_presets_column_map(tmp_path):
    """presets/mathvista-leaderboard.yaml trains on Geometry3K: its Hub schema (images as a list of
    one, problem with a `<image>` placeholder, answer, int id, choices, ground_truth letter) on a
    local file, read through the preset's own column map."""
    import yaml
    from datasets import Dataset, Features, Image, List, Value

    preset = yaml.safe_load((REPO / "presets" / "mathvista-leaderboard.yaml").read_text())
    columns = {key: value for key, value in preset.items() if key.startswith("data.columns.")}
    rng = random.Random(11)
    rows = [{"images": [{"bytes": _encode(_picture(rng)), "path": None}],
             "problem": f"<image>Find x in figure {i}.", "answer": ["12", "\\frac{20}{3}", "2\\sqrt{221}"][i % 3],
             "id": i, "choices": ["3", "12", "\\frac{20}{3}", "2\\sqrt{221}"], "ground_truth": "B"} for i in range(20)]
    features = Features({"images": List(Image()), "problem": Value("string"), "answer": Value("string"),
                         "id": Value("int64"), "choices": List(Value("string")), "ground_truth": Value("string")})
    source = tmp_path / "geometry3k.parquet"
    Dataset.from_list(rows, features=features).to_parquet(str(source))
    report = prep.prepare(make_params(source, **columns), tmp_path / "data")
    assert report["dropped"] == {} and report["rows_kept"] == 20
    data = [*load_split(tmp_path / "data", "train"), *load_split(tmp_path / "data", "eval")]
    first = next(row for row in data if row["id"] == "1")
    assert first["question"] == "Find x in figure 1." and "<image>" not in first["prompt"][1]["content"]
    assert first["answer"] == "\\frac{20}{3}" and first["question_type"] == "free_form" and first["choices"] is None
