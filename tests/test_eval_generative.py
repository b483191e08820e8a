"""Generative benchmarks (VQAv2 / TextVQA / Clotho-AQA / LibriSpeech layouts) run offline on local copies of their
data with a tiny random Uni-MoE: batched left-padded generation equals one-by-one generation, and the scores equal
values computed by hand from the predictions (references are built from what the model says)."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from multimodal_moe.cli import main
from multimodal_moe.eval.benchmarks import BENCHMARKS, _normalize_text, run_benchmark
from test_uni_moe import make_model, make_processor

RNG = np.random.default_rng(0)
IMAGES = [Image.fromarray(RNG.integers(0, 255, (36, 40, 3), dtype=np.uint8)) for _ in range(5)]
CLIPS = [(RNG.standard_normal(4000) * 0.1).astype(np.float32) for _ in range(3)]  # 0.5 s at 8 kHz


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def vqa_data(answers):
    return datasets.Dataset.from_dict(
        {"image": IMAGES[: len(answers)], "question": [f"w{i + 1} w{i + 2}" for i in range(len(answers))],
         "answers": [[{"answer": a, "answer_id": j} for j, a in enumerate(row)] for row in answers]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answers": [{"answer": datasets.Value("string"),
                                                 "answer_id": datasets.Value("int32")}]}))


def speech_data(texts):
    return datasets.Dataset.from_dict(
        {"audio": [{"array": c.tolist(), "sampling_rate": 8000} for c in CLIPS[: len(texts)]], "text": texts})


def one_by_one(model, processor, bench, data, max_new_tokens):
    """Reference: each example alone (no padding), greedy, decoded new tokens."""
    from multimodal_moe.eval.benchmarks import _audio_array, _prompt

    out = []
    for row in data:
        kwargs = {"text": [_prompt(bench, processor, row.get(bench.question_column))]}
        if bench.image_column:
            kwargs["images"] = [row[bench.image_column].convert("RGB")]
        if bench.audio_column:
            kwargs["audio"] = [_audio_array(row[bench.audio_column], 16000)]
        inputs = processor(**kwargs)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = ids[0, inputs["input_ids"].shape[1]:]
        out.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return out


def test_vqa_batched_generation_and_vqa_accuracy_by_hand(model, processor, tmp_path):
    bench = BENCHMARKS["vqav2"]
    probe = vqa_data([["x"] * 10] * 4)
    first = run_benchmark(model, "vqav2", processor=processor, data=probe, batch_size=3, max_new_tokens=3)
    predictions = [r["prediction"] for r in first["predictions"]]
    assert predictions == one_by_one(model, processor, bench, probe, 3)  # left padding changes nothing
    assert len(set(predictions)) > 1 and all(predictions)  # a random model: varied, non-empty answers
    # references built from the predictions: 10 matches -> 1, 1 match -> 0.3 (9 of the 10 leave-one-out subsets hold
    # it: mean of 9 x 1/3), 3 matches -> 1 (subsets with 2 matches give 2/3: 3 of 10) = 0.9, none -> 0
    answers = [[predictions[0]] * 10, [predictions[1]] + ["zz"] * 9, [predictions[2]] * 3 + ["zz"] * 7, ["zz"] * 10]
    path = tmp_path / "vqa"
    datasets.DatasetDict({"validation": vqa_data(answers)}).save_to_disk(str(path))
    results = run_benchmark(model, "vqav2", processor=processor, data=str(path), batch_size=3, max_new_tokens=3,
                            output_dir=tmp_path / "out")
    assert [r["prediction"] for r in results["predictions"]] == predictions
    assert [r["score"] for r in results["predictions"]] == pytest.approx([1.0, 0.3, 0.9, 0.0])
    assert results["metrics"]["all"]["vqa_accuracy"] == pytest.approx((1.0 + 0.3 + 0.9 + 0.0) / 4)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["dataset"]["examples"] == 4 and saved["generation"]["max_new_tokens"] == 3
    assert "| all | " in (tmp_path / "out" / "results.md").read_text()


def test_librispeech_wer_cer_by_hand_with_resampled_audio(model, processor):
    probe = speech_data(["X", "X"])
    first = run_benchmark(model, "librispeech", processor=processor, data=probe, batch_size=2, max_new_tokens=4)
    predictions = [r["prediction"] for r in first["predictions"]]
    assert predictions == one_by_one(model, processor, BENCHMARKS["librispeech"], probe, 4)
    # LibriSpeech style references: upper case, punctuation removed by the normaliser. Row 0 is the prediction itself
    # (0 errors); row 1 is one word absent from the prediction: max(n, 1) errors for an n-word prediction.
    ref0 = predictions[0].upper() + "."
    results = run_benchmark(model, "librispeech", processor=processor, data=speech_data([ref0, "ZZ"]), batch_size=2,
                            max_new_tokens=4)
    n0, n1 = len(predictions[0].split()), len(predictions[1].split())
    assert results["metrics"]["all"]["wer"] == pytest.approx(max(n1, 1) / (n0 + 1))
    # CER: no 'z' in a prediction made of w<digits> words, so row 1 costs max(chars, 2) edits
    chars1 = len(_normalize_text(predictions[1]))
    assert "z" not in predictions[1]
    expected_cer = max(chars1, 2) / (len(_normalize_text(ref0)) + 2)
    assert results["metrics"]["all"]["cer"] == pytest.approx(expected_cer)


def test_cli_data_option_and_errors(model, processor, tmp_path, capsys):
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "clotho"
    datasets.Dataset.from_dict({"context": [{"array": c.tolist(), "sampling_rate": 8000} for c in CLIPS[:2]],
                                "instruction": ["w1 w2", "w3"], "answer": ["yes", "no"]}).save_to_disk(str(path))
    assert main(["eval", str(tmp_path / "ckpt"), "--benchmark", "clotho-aqa", "--data", str(path),
                 "--max-new-tokens", "2", "--output-dir", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    correct = [_normalize_text(r["prediction"]) == r["references"] for r in results["predictions"]]
    assert results["metrics"]["all"]["accuracy"] == pytest.approx(sum(correct) / 2)
    assert "| subset | accuracy |" in capsys.readouterr().out
    # a text-only model can't take a VQA benchmark: the error names the missing part
    text_only = make_model(vision_config=None, audio_config=None)
    with pytest.raises(ValueError, match="needs a model with vision input"):
        run_benchmark(text_only, "vqav2", processor=processor, data=vqa_data([["a"] * 10]))
