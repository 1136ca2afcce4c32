"""The benchmark runner on a mini CustomConcept101-format dataset: results, resume, 2 processes, report."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import CONCEPTS, bench_argv, finished_benchmark

from persres.cli import main
from persres.config import ResidualConfig, TrainConfig
from persres.errors import ConfigError, InputError
from persres.evaluation.benchmark import (
    BenchmarkConfig,
    Variant,
    check_same_settings,
    plan_variants,
    run_benchmark,
    settings_of,
    variant_train_config,
)
from persres.evaluation.categories import auto_sampler, prompt_category
from persres.evaluation.cc101 import load_dataset
from persres.evaluation.report import write_report
from persres.evaluation.results import merge_results
from persres.files import write_json
from persres.inference.sampling import SampleSettings
from persres.methods import get_method


def mini_config(dataset: Path, base: Path, out: Path, scorers: tuple[str, str]) -> BenchmarkConfig:
    return BenchmarkConfig(
        dataset=str(dataset),
        base=str(base),
        out=str(out),
        images_per_prompt=1,
        samplers=("normal", "lag", "auto"),
        ranks=(0.05, 2),
        train=TrainConfig(
            base=str(base),
            images="-",
            class_word="-",
            steps=2,
            batch_size=1,
            resolution=16,
            checkpoint_every=1,
        ),
        sample=SampleSettings(steps=2, height=16, width=16),
        clip=scorers[0],
        dino=scorers[1],
    )


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as handle:
        return list(csv.DictReader(handle))


def test_dataset_entries_and_prompts(dataset: Path) -> None:
    entries = load_dataset(dataset)
    assert [(e.name, e.category, e.class_word) for e in entries] == [
        ("pet_dog", "pet", "dog"),
        ("toy_cup", "toy", "cup"),
    ]
    assert entries[0].prompts == ("a photo of V* dog", "V* dog on the beach")


@pytest.mark.parametrize("hostile", ["../outside", "/etc", "benchmark_dataset/../../x", "~/photos"])
def test_paths_leaving_the_dataset_are_refused(dataset: Path, hostile: str) -> None:
    entries = json.loads((dataset / "dataset.json").read_text())
    entries[1]["instance_data_dir"] = hostile
    (dataset / "dataset.json").write_text(json.dumps(entries))
    with pytest.raises(InputError, match="refused|absolute"):
        load_dataset(dataset)


def test_prompt_categories() -> None:
    examples = {
        "a photo of a V* dog": "identity",
        "V* dog": "identity",
        "V* dog on the beach": "change_background",
        "V* barn with the Eiffel Tower in the background": "add_object",
        "a red V* car": "change_attribute",
        "V* teddybear made of glass": "change_attribute",
        "Georgia O'Keeffe style V* barn painting.": "artistic_style",
        "a watercolor of V* dog": "artistic_style",
        "a chair in the style of V* sofa": "object_in_style",
        "a V* dog wearing a hat": "add_object",
    }
    assert {p: prompt_category(p) for p in examples} == examples
    assert auto_sampler("V* dog on the beach") == "lag" and auto_sampler("a red V* car") == "normal"


@pytest.mark.slow
def test_benchmark_resume_and_report(
    dataset: Path,
    conv_base: Path,
    tmp_path: Path,
    scorer_models: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "bench"
    config = mini_config(dataset, conv_base, out, scorer_models)
    import persres.evaluation.benchmark as bench

    real_score = bench.score_samples
    calls: list[str] = []

    def crash_on_second(samples_dir: Path, entry, scorers, canonical):  # type: ignore[no-untyped-def]
        calls.append(entry.name)
        if entry.name == "toy_cup":
            raise RuntimeError("simulated crash")
        return real_score(samples_dir, entry, scorers, canonical)

    monkeypatch.setattr(bench, "score_samples", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_benchmark(config, device="cpu", progress=False)
    assert (out / "runs" / "pet_dog" / "rank-0.05" / "result.json").is_file()
    assert not (out / "runs" / "toy_cup" / "rank-0.05" / "result.json").exists()

    monkeypatch.setattr(bench, "score_samples", real_score)
    trained: list[str] = []
    real_train = bench.train
    monkeypatch.setattr(
        bench, "train", lambda cfg, *a, **k: trained.append(Path(cfg.images).name) or real_train(cfg, *a, **k)
    )
    run_benchmark(config, device="cpu", progress=False)
    assert trained == ["toy_cup", "toy_cup"]  # the finished concept (both ranks) was skipped
    rows = read_rows(out)
    assert len(rows) == 12 and len({(r["concept"], r["rank"], r["sampler"]) for r in rows}) == 12
    assert {r["rank"] for r in rows} == {"0.05", "2"}
    assert {r["concept"] for r in rows} == set(CONCEPTS)
    for row in rows:
        assert (
            0 <= float(row["clip_t"]) <= 2.5 and -1 <= float(row["clip_i"]) <= 1 and row["num_images"] == "2"
        )
        assert float(row["train_seconds"]) > 0 and row["category"] in ("pet", "toy")
    auto = {r["concept"]: r for r in rows if r["sampler"] == "auto" and r["rank"] == "2"}
    lag = {r["concept"]: r for r in rows if r["sampler"] == "lag" and r["rank"] == "2"}
    normal = {r["concept"]: r for r in rows if r["sampler"] == "normal" and r["rank"] == "2"}
    for concept in CONCEPTS:  # both prompts (identity, change background) are LAG prompts: auto == lag
        assert [auto[concept][m] for m in ("clip_t", "clip_i", "dino_i")] == [
            lag[concept][m] for m in ("clip_t", "clip_i", "dino_i")
        ]
    assert normal.keys() == lag.keys()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["concepts"] == sorted(CONCEPTS)
    assert set(summary["per_category"]) == {"pet", "toy"}
    assert set(summary["per_prompt_category"]) == {"identity", "change_background"}
    assert sorted(summary["overall"]) == sorted(
        f"rank={r} sampler={s}" for r in ("0.05", "2") for s in ("auto", "lag", "normal")
    )

    rerun_rows = read_rows(out)
    run_benchmark(config, device="cpu", progress=False)  # nothing left to do: the same rows
    assert read_rows(out) == rerun_rows

    report = write_report(out)
    page = report.read_text()
    assert page.count("data:image/png;base64,") >= 2 + 2 * 3  # two figures, three thumbnail rows per concept
    assert "http://" not in page and "https://" not in page  # opens offline
    assert "pet_dog" in page and "<table>" in page
    with pytest.raises(Exception, match="already exists"):
        write_report(out)


@pytest.mark.slow
def test_two_processes_split_the_concepts(
    dataset: Path, conv_base: Path, tmp_path: Path, scorer_models: tuple[str, str]
) -> None:
    out = tmp_path / "bench2"
    argv = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # accelerate's torchrun launcher: gloo CPU processes when there is no GPU
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "persres",
        "benchmark",
        "--dataset",
        str(dataset),
        "--base",
        str(conv_base),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--resolution",
        "16",
        "--images-per-prompt",
        "1",
        "--sample-steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--clip",
        scorer_models[0],
        "--dino",
        scorer_models[1],
        "--device",
        "cpu",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == 6 and {r["concept"] for r in rows} == set(CONCEPTS)
    assert len({(r["concept"], r["sampler"]) for r in rows}) == 6
    processes = {json.loads(p.read_text())["process_index"] for p in out.glob("runs/*/*/result.json")}
    assert processes == {0, 1}


@pytest.mark.slow
def test_class_sources_are_compared_on_the_same_texts(
    dataset: Path, conv_base: Path, tmp_path: Path, scorer_models: tuple[str, str]
) -> None:
    nouns = tmp_path / "nouns.txt"
    nouns.write_text("cat\ncup\nchair\nball\n")
    config = replace(
        mini_config(dataset, conv_base, tmp_path / "bench", scorer_models),
        concepts=("pet_dog",),
        class_sources=("dataset", "nearest"),
        nouns=str(nouns),
    )
    run_benchmark(config, device="cpu", progress=False)
    rows = read_rows(tmp_path / "bench")
    assert {(r["class_source"], r["sampler"]) for r in rows} == {
        (c, s) for c in ("dataset", "nearest") for s in ("normal", "lag", "auto")
    }
    chosen = {r["class_word"] for r in rows if r["class_source"] == "nearest"}
    assert len(chosen) == 1 and chosen <= {"cat", "cup", "chair", "ball"}
    result = json.loads(
        (tmp_path / "bench" / "runs" / "pet_dog" / "rank-0.05-class-nearest" / "result.json").read_text()
    )
    assert {i["text"] for i in result["images"]} == {
        "a photo of dog",
        "dog on the beach",
    }  # the dataset's wording
    assert result["train_config"]["class_word"] in chosen
    summary = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert "rank=0.05 class=nearest sampler=lag" in summary["overall"]


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ("a photo of {}\n<new1> on the beach\n", "line 2: prompt 'V* on the beach' has no class word 'dog'"),
        ("a photo of {}\n\n{} on the beach" + " on the beach" * 30 + "\n", "line 3: prompt 'V* dog on the"),
    ],
)
def test_prompts_are_checked_before_any_training(
    dataset: Path,
    conv_base: Path,
    tmp_path: Path,
    scorer_models: tuple[str, str],
    lines: str,
    problem: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (dataset / "prompts" / "dog.txt").write_text(lines)
    out = tmp_path / "bench"
    assert main(bench_argv(dataset, conv_base, out, scorer_models)) == 2
    err = capsys.readouterr().err
    assert f"{dataset / 'prompts' / 'dog.txt'} {problem}" in err and len(err) < 500
    if "beach on" in lines:
        assert "is 97 tokens, above the base model's limit of 77 (CLIPTextModel); shorten the line" in err
    assert not (out / "runs").exists()


@pytest.mark.parametrize(
    ("content", "problem"), [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object")]
)
def test_a_damaged_settings_file_is_named(
    dataset: Path,
    conv_base: Path,
    tmp_path: Path,
    scorer_models: tuple[str, str],
    content: str,
    problem: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "bench"
    out.mkdir()
    (out / "benchmark.json").write_text(content)
    assert main(bench_argv(dataset, conv_base, out, scorer_models)) == 2
    err = capsys.readouterr().err
    assert f"{out / 'benchmark.json'} is damaged ({problem}" in err and "choose another --out" in err
    assert not (out / "runs").exists()


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("runs/pet_dog/rank-0.05/result.json", b'{"rows": [', "not valid JSON"),
        ("runs/pet_dog/rank-0.05/result.json", b'{"rows": [{"concept": "pet_dog"}]}', "row 0 lacks the text"),
        (
            "runs/pet_dog/rank-0.05/result.json",
            b'{"rows": [], "images": []}',
            "'rows' is not a non-empty list",
        ),
        ("results.csv", b"concept,rank,sampler\npet_dog,0.05\n", "row 1 has fewer fields than its header"),
        ("results.csv", b"concept,rank,sampler\npet_dog,0.05,lag,extra\n", "row 1 has more fields"),
        ("results.csv", b"concept,rank,sampler\ncaf\xe9,1,lag\n", "not UTF-8 text"),
        ("results.csv", b"name,score\nx,1\n", "its header 'name,score' is not persres'"),
    ],
)
def test_report_refuses_damaged_files_naming_them(
    tmp_path: Path, name: str, content: bytes, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = finished_benchmark(tmp_path)
    assert main(["report", str(out), "--out", str(tmp_path / "sound.html")]) == 0
    assert (tmp_path / "sound.html").read_text().count("data:image/png;base64,") >= 2 + 3
    (out / name).write_bytes(content)
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / name} is damaged ({problem}" in err and "rerun persres benchmark" in err
    assert not (out / "report.html").exists()


def test_a_damaged_result_outside_the_run_is_refused_before_training(
    dataset: Path,
    conv_base: Path,
    tmp_path: Path,
    scorer_models: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = finished_benchmark(tmp_path)
    damaged = out / "runs" / "pet_dog" / "rank-0.05" / "result.json"
    damaged.write_text('{"rows": [{"concept": "pet_dog", "sampler": 3}]}')
    assert main([*bench_argv(dataset, conv_base, out, scorer_models), "--concept", "toy_cup"]) == 2
    err = capsys.readouterr().err
    assert f"{damaged} is damaged (row 0 lacks the text field 'category')" in err
    assert "delete it and rerun persres benchmark" in err
    assert not (out / "runs" / "toy_cup").exists()


@pytest.mark.slow
def test_a_damaged_result_of_the_run_is_redone(
    dataset: Path,
    conv_base: Path,
    tmp_path: Path,
    scorer_models: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "bench"
    config = replace(
        mini_config(dataset, conv_base, out, scorer_models),
        concepts=("pet_dog",),
        ranks=(2,),
        samplers=("normal",),
    )
    run_benchmark(config, device="cpu", progress=False)
    result = out / "runs" / "pet_dog" / "rank-2" / "result.json"
    sound = json.loads(result.read_text())
    result.write_text(result.read_text()[:100])  # cut off, as by a full disk
    with caplog.at_level(logging.WARNING, logger="persres"):
        run_benchmark(config, device="cpu", progress=False)
    assert f"{result} is damaged (not valid JSON" in caplog.text and "redoing the variant" in caplog.text
    redone = json.loads(result.read_text())
    assert redone["rows"][0].keys() == sound["rows"][0].keys()
    assert [(r["concept"], r["rank"], r["sampler"]) for r in read_rows(out)] == [("pet_dog", "2", "normal")]


def test_a_variant_without_a_train_template_uses_the_training_defaults(dataset: Path, tmp_path: Path) -> None:
    entry = load_dataset(dataset)[0]
    variant = Variant(entry, 2, "dataset", tmp_path / "variant")
    config = BenchmarkConfig(dataset=str(dataset), base="some/base", out=str(tmp_path / "out"))  # train=None
    made = variant_train_config(config, variant, "dog", "dataset.json class_prompt")
    expected = TrainConfig(
        base="some/base",
        images=str(entry.images),
        class_word="dog",
        class_reason="dataset.json class_prompt",
        residual=ResidualConfig(rank=2),
    )
    assert made == expected
    assert (made.steps, made.batch_size, made.lr) == (150, 4, 1e-3)  # the paper's recipe


def test_a_variant_keeps_the_train_template_settings(dataset: Path, tmp_path: Path) -> None:
    entry = load_dataset(dataset)[1]
    template = TrainConfig(
        base="other", images="-", class_word="-", steps=7, lr=5e-4, residual=ResidualConfig(init="random")
    )
    config = BenchmarkConfig(dataset=str(dataset), base="some/base", out=str(tmp_path / "o"), train=template)
    made = variant_train_config(config, Variant(entry, 0.25, "nearest", tmp_path / "v"), "mug", "nearest")
    assert (made.base, made.images, made.class_word, made.class_reason) == (
        "some/base",
        str(entry.images),
        "mug",
        "nearest",
    )
    assert (made.steps, made.lr, made.residual) == (7, 5e-4, ResidualConfig(rank=0.25, init="random"))


def test_benchmark_settings_are_fixed_per_output_folder(tmp_path: Path) -> None:
    config = BenchmarkConfig(dataset="d", base="b", out=str(tmp_path), samplers=("lag", "lag", "normal"))
    assert config.samplers == ("lag", "normal")  # a repeated flag counts once
    check_same_settings(tmp_path, config)
    check_same_settings(tmp_path, config)  # the same settings resume
    with pytest.raises(ConfigError, match="other settings \\(images_per_prompt\\)"):
        check_same_settings(tmp_path, replace(config, images_per_prompt=2))
    with pytest.raises(ConfigError, match="`max_prompts` must be >= 1"):
        BenchmarkConfig(dataset="d", base="b", out="o", max_prompts=0)


COST_COLUMNS = ("trainable_parameters", "file_size_bytes", "train_seconds", "peak_memory_bytes")


@pytest.mark.slow
def test_methods_are_compared_on_the_same_prompts_and_seeds(
    dataset: Path,
    conv_base: Path,
    tmp_path: Path,
    scorer_models: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "bench"
    methods = ("residuals", "lora", "textual-inversion")
    argv = [*bench_argv(dataset, conv_base, out, scorer_models), "--max-prompts", "1"]
    argv += [flag for m in methods for flag in ("--method", m)]
    assert main(argv) == 0
    rows = read_rows(out)
    expected = {(c, "personalized-residuals", s) for c in CONCEPTS for s in ("normal", "lag", "auto")}
    expected |= {(c, m, "normal") for c in CONCEPTS for m in methods[1:]}
    assert {(r["concept"], r["method"], r["sampler"]) for r in rows} == expected and len(rows) == 10
    for row in rows:
        assert all(int(float(row[k])) > 0 for k in COST_COLUMNS if k != "train_seconds"), row
        assert float(row["train_seconds"]) > 0 and row["peak_memory_source"] == "process-peak-rss"
        assert row["rank"] == ("0.05" if row["method"] == "personalized-residuals" else "")
    parameters = {r["method"]: int(r["trainable_parameters"]) for r in rows if r["concept"] == "pet_dog"}
    assert len(set(parameters.values())) == 3  # each method trains its own parameters
    for concept in CONCEPTS:  # the same prompt and seeds for every method
        seeds = {
            f: normal_seeds(out / "runs" / concept / f) for f in ("rank-0.05", "lora", "textual-inversion")
        }
        assert seeds["rank-0.05"] == seeds["lora"] and len(seeds["lora"]) == 1
        assert [s for _, s in seeds["textual-inversion"]] == [s for _, s in seeds["lora"]]
    result = json.loads((out / "runs" / "pet_dog" / "lora" / "result.json").read_text())
    recipe = {
        "method": "lora",
        "steps": 2,
        "batch_size": 1,
        "lr": 1e-4,
        "prior_images": 0,
        "prior_weight": 0.0,
    }
    assert result["recipe"] == recipe  # --steps and --batch-size given apply to every method; lr is LoRA's
    summary = json.loads((out / "summary.json").read_text())
    assert {"rank=0.05 sampler=lag", "method=lora sampler=normal"} <= set(summary["overall"])
    assert summary["costs"]["method=lora"]["trainable_parameters"] == parameters["lora"]
    page = write_report(out).read_text()
    assert "textual-inversion: normal sampling only" in page and "peak resident set size" in page

    import persres.evaluation.benchmark as bench

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")}
    monkeypatch.setattr(bench, "train", lambda *a, **k: pytest.fail("a finished variant was trained again"))
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")} == mtimes
    assert read_rows(out) == rows


def normal_seeds(folder: Path) -> list[tuple[str, int]]:
    images = json.loads((folder / "result.json").read_text())["images"]
    return sorted((i["prompt"], i["seed"]) for i in images if i["sampler"] == "normal")


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--method", "lora", "--sampler", "lag"], "--sampler lag applies to residuals only"),
        (["--method", "lora", "--sampler", "normal", "--sampler", "auto"], "--sampler auto applies to"),
        (["--method", "residuals", "--method", "lora", "--sampler", "lag"], "add --sampler normal"),
        (["--method", "textual-inversion", "--rank", "4"], "--rank applies to --method residuals only"),
        (["--method", "unknown"], "argument --method: invalid choice: 'unknown'"),
    ],
)
def test_options_other_methods_cannot_take_are_refused(
    dataset: Path,
    conv_base: Path,
    tmp_path: Path,
    scorer_models: tuple[str, str],
    extra: list[str],
    problem: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "bench"
    assert main([*bench_argv(dataset, conv_base, out, scorer_models), *extra]) == 2
    assert problem in capsys.readouterr().err
    assert not out.exists()


def test_each_method_trains_with_its_own_recipe_unless_given(dataset: Path, tmp_path: Path) -> None:
    entry = load_dataset(dataset)[0]
    template = TrainConfig(base="b", images="-", class_word="-", steps=7, batch_size=2)
    methods = ("residuals", "lora", "dreambooth")
    config = BenchmarkConfig(
        dataset=str(dataset), base="b", out=str(tmp_path), train=template, methods=methods
    )
    variants = plan_variants(tmp_path, config, [entry])
    assert [(v.method, v.rank, v.folder.relative_to(tmp_path).as_posix()) for v in variants] == [
        ("residuals", 0.05, "runs/pet_dog/rank-0.05"),
        ("lora", None, "runs/pet_dog/lora"),
        ("dreambooth", None, "runs/pet_dog/dreambooth"),
    ]
    made = {v.method: variant_train_config(config, v, "dog", "r") for v in variants}
    recipe = {m: (c.method, c.steps, c.batch_size, c.lr) for m, c in made.items()}
    assert recipe["residuals"] == ("residuals", 7, 2, 1e-3)  # the template is residuals' recipe
    assert recipe["lora"] == ("lora", 500, 1, 1e-4)
    assert made["dreambooth"].prior_images == get_method("dreambooth").recipe.prior_images > 0
    shared = replace(config, shared_recipe=("steps",))
    lora = variant_train_config(shared, variants[1], "dog", "r")
    assert (lora.steps, lora.batch_size) == (7, 1)  # the given steps; LoRA's own batch size


def test_settings_written_before_methods_still_resume(tmp_path: Path) -> None:
    config = BenchmarkConfig(dataset="d", base="b", out=str(tmp_path))
    saved = settings_of(config)
    assert "methods" not in saved  # a residuals-only benchmark.json is as it was before methods came
    write_json(tmp_path / "benchmark.json", saved)
    check_same_settings(tmp_path, config)
    with pytest.raises(ConfigError, match="other settings \\(methods, shared_recipe\\)"):
        check_same_settings(tmp_path, replace(config, methods=("residuals", "lora")))


def test_results_without_cost_columns_and_peer_rows_without_rank_are_read(tmp_path: Path) -> None:
    out = finished_benchmark(tmp_path)  # rows written before the cost columns came
    folder = out / "runs" / "pet_dog" / "lora"
    folder.mkdir()
    result = json.loads((out / "runs" / "pet_dog" / "rank-0.05" / "result.json").read_text())
    images = [dict(i, sampler="normal") for i in result["images"][:1]]
    row = {**result["rows"][0], "method": "lora", "trainable_parameters": 10, "file_size_bytes": 99}
    del row["rank"]
    write_json(folder / "result.json", dict(result, rows=[row], images=images))
    merge_results(out)
    rows = read_rows(out)
    assert [(r["method"], r["rank"], r["trainable_parameters"]) for r in rows] == [
        ("lora", "", "10"),
        ("", "0.05", ""),
        ("", "0.05", ""),
    ]
    assert json.loads((out / "summary.json").read_text())["costs"] == {}  # no train_seconds: not a cost row
    del result["rows"][0]["rank"]  # a residuals row still needs its rank
    write_json(folder / "result.json", result, overwrite=True)
    with pytest.raises(InputError, match="row 0 lacks the number 'rank'"):
        merge_results(out)
