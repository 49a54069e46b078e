"""tools/preprocess_data.py and megatron_rmt.tokenizer: read-back equality, bad input, Ctrl-C.

References are independent of the code under test: documents are re-tokenized with the bare
`tokenizers` library (or known GPT-2 ids) and outputs are read with megatron.core's
IndexedDataset, the reader Megatron-LM itself uses.
"""

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import missing
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer

from megatron_rmt.tokenizer import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "..", "shared", "assets")
QWEN3 = os.path.join(ASSETS, "tokenizers", "qwen3")
GPT2 = os.path.join(ASSETS, "tokenizers", "gpt2")
MATH_TRAIN = os.path.join(ASSETS, "math", "math_train.jsonl")
SCRIPT = os.path.join(REPO, "tools", "preprocess_data.py")
GPT2_BUNDLED = os.path.join(REPO, "corpus", "gpt2_tokenizer")


@pytest.fixture
def assets():
    """../shared/assets (tokenizers, MATH), or `missing`."""
    if not os.path.isdir(QWEN3):
        missing(f"the shared assets {ASSETS}", "check out ../shared beside the project")


_spec = importlib.util.spec_from_file_location("preprocess_data", SCRIPT)
preprocess_data = importlib.util.module_from_spec(_spec)
sys.modules["preprocess_data"] = preprocess_data  # workers' tasks are pickled by module name
_spec.loader.exec_module(preprocess_data)


def run(input_path, prefix, *extra):
    argv = ["--input", str(input_path), "--output-prefix", str(prefix)]
    argv += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", QWEN3]
    return preprocess_data.main(argv + ["--append-eod", "--log-interval", "50", *extra])


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def good(text: str) -> bytes:
    return json.dumps({"text": text}).encode()


@pytest.mark.usefixtures("assets")
def test_math_train_reads_back_token_for_token(tmp_path):
    """The full MATH training file, two keys, two workers (the ordered multiprocess path)."""
    stats = run(
        MATH_TRAIN, tmp_path / "math", "--json-keys", "problem", "solution", "--workers", "2"
    )
    bare = Tokenizer.from_file(os.path.join(QWEN3, "tokenizer.json"))
    eod = bare.token_to_id("<|endoftext|>")
    with open(MATH_TRAIN, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert stats.documents == len(records) == 4500 and stats.bad_lines == 0
    for key in ("problem", "solution"):
        ds = IndexedDataset(str(tmp_path / f"math_{key}_document"))
        assert len(ds) == len(records)
        assert ds.index.dtype == np.int32  # Qwen3's 151,669 ids need more than uint16
        for i, record in enumerate(records):
            want = bare.encode(record[key], add_special_tokens=False).ids + [eod]
            assert ds[i].tolist() == want, f"{key} document {i}"


BAD_LINES = {
    "malformed JSON": b'{"text": "unterminated',
    "missing key 'text'": b'{"body": "x"}',
    "key 'text' holds a int, expected a string": b'{"text": 5}',
    "invalid UTF-8": b'{"text": "caf\xe9"}',
    "empty document in key 'text'": b'{"text": "  \\n "}',
}


@pytest.mark.usefixtures("assets")
@pytest.mark.parametrize("problem", list(BAD_LINES))
def test_bad_line_stops_with_location_and_leaves_nothing(tmp_path, problem):
    lines = [good("first"), good("second"), BAD_LINES[problem], good("fourth")]
    path = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    with pytest.raises(preprocess_data.BadInputError) as error:
        run(path, out / "corpus")
    assert str(error.value).startswith(f"{path}:3: {problem}")
    assert os.listdir(out) == []  # neither final nor temporary files


@pytest.mark.usefixtures("assets")
def test_bad_line_found_by_a_worker_also_stops(tmp_path):
    lines = [good(f"document {i}") for i in range(300)]
    lines[250] = BAD_LINES["invalid UTF-8"]
    path = write_lines(tmp_path / "in.jsonl", lines)
    with pytest.raises(preprocess_data.BadInputError, match=r"in\.jsonl:251: invalid UTF-8"):
        run(path, tmp_path / "out" / "corpus", "--workers", "2")
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.usefixtures("assets")
def test_skip_bad_lines_counts_and_keeps_the_rest(tmp_path, capsys):
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    lines = [good(texts[0]), *BAD_LINES.values(), b"", good(texts[1]), good(texts[2])]
    path = write_lines(tmp_path / "in.jsonl", lines)
    stats = run(path, tmp_path / "c", "--skip-bad-lines")
    assert (stats.documents, stats.bad_lines) == (3, len(BAD_LINES))  # the blank line is no doc
    assert f"skipped {len(BAD_LINES)} bad lines" in capsys.readouterr().err
    tok = build_tokenizer("HuggingFaceTokenizer", QWEN3)
    ds = IndexedDataset(str(tmp_path / "c_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod] for t in texts]


def _input_interrupted_at_line_300(tmp_path, monkeypatch, interrupt):
    """400 documents whose encoding calls `interrupt()` at the 300th line; their path."""
    path = write_lines(tmp_path / "in.jsonl", [good(f"doc {i}") for i in range(400)])
    original = preprocess_data.DocumentEncoder.encode_line
    calls = []

    def encode_line(self, raw):
        calls.append(raw)
        if len(calls) == 300:
            interrupt()
        return original(self, raw)

    monkeypatch.setattr(preprocess_data.DocumentEncoder, "encode_line", encode_line)
    return path


@pytest.mark.usefixtures("assets")
def test_ctrl_c_in_process_leaves_nothing(tmp_path, monkeypatch):
    def ctrl_c():
        raise KeyboardInterrupt

    path = _input_interrupted_at_line_300(tmp_path, monkeypatch, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run(path, tmp_path / "out" / "corpus")
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.usefixtures("assets")
def test_a_ctrl_c_swallowed_where_it_landed_still_stops_the_run(tmp_path, monkeypatch):
    """A real SIGINT whose KeyboardInterrupt is caught and dropped where Python raised it (as
    Python does in an at-fork hook while the worker pool starts): the run must not commit."""

    def swallowed_sigint():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the handler runs here
        except KeyboardInterrupt:
            pass

    path = _input_interrupted_at_line_300(tmp_path, monkeypatch, swallowed_sigint)
    # Ctrl-C handled as in a foreground process (a suite started in the background ignores it).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(path, tmp_path / "out" / "corpus")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.usefixtures("assets")
def test_sigint_with_workers_leaves_nothing(tmp_path):
    """A real Ctrl-C (SIGINT) while two workers are busy on ~11 MB of MATH text."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    with open(MATH_TRAIN, "rb") as f:
        content = f.read()
    for i in range(3):
        (folder / f"part{i}.jsonl").write_bytes(content)
    out = tmp_path / "out"
    argv = [sys.executable, SCRIPT, "--input", str(folder), "--output-prefix", str(out / "c")]
    argv += ["--json-keys", "solution", "--tokenizer-type", "HuggingFaceTokenizer"]
    argv += ["--tokenizer-model", QWEN3, "--workers", "2"]
    # The script as started from a terminal: a suite run in the background (`cmd &` in a
    # script) ignores SIGINT, and a child would inherit that and rightly keep ignoring it.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    while proc.poll() is None and not (out.is_dir() and os.listdir(out)):
        time.sleep(0.05)  # wait for the temporary output: work has started
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and b"interrupted" in err
    assert os.listdir(out) == []


@pytest.mark.usefixtures("assets")
def test_inputs_as_gzip_directory_and_glob_match_plain_file(tmp_path):
    lines = [good(f"Question: {i} + {i}?\nAnswer: {2 * i}.") for i in range(50)]
    plain = write_lines(tmp_path / "a.jsonl", lines[:30])
    folder = tmp_path / "parts"
    folder.mkdir()
    write_lines(folder / "a.jsonl", lines[:30])
    with gzip.open(folder / "b.jsonl.gz", "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines[30:]))
    write_lines(tmp_path / "b.jsonl", lines[30:])

    run(plain.parent / "[ab].jsonl", tmp_path / "glob")
    run(folder, tmp_path / "dir")
    for name in ("glob", "dir"):
        ds = IndexedDataset(str(tmp_path / f"{name}_text_document"))
        assert len(ds) == 50
    glob_ds = IndexedDataset(str(tmp_path / "glob_text_document"))
    dir_ds = IndexedDataset(str(tmp_path / "dir_text_document"))
    assert all(np.array_equal(glob_ds[i], dir_ds[i]) for i in range(50))


@pytest.mark.usefixtures("assets")
@pytest.mark.parametrize("keep_newlines", [False, True])
def test_split_sentences(tmp_path, monkeypatch, keep_newlines):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [os.path.join(ASSETS, "nltk_data")])
    text = "Mr. Smith went home. He was tired!\n\nThen he slept."
    path = write_lines(tmp_path / "in.jsonl", [good(text)])
    extra = ["--split-sentences"] + (["--keep-newlines"] if keep_newlines else [])
    run(path, tmp_path / "s", *extra)
    ds = IndexedDataset(str(tmp_path / "s_text_sentence"))
    tok = build_tokenizer("HuggingFaceTokenizer", QWEN3)
    if keep_newlines:
        sentences = ["Mr. Smith went home. ", "He was tired!\n\n", "Then he slept."]
    else:
        sentences = ["Mr. Smith went home.", "He was tired!", "Then he slept."]
    want = [tok.encode(s) for s in sentences]
    want[-1].append(tok.eod)
    assert [ds[i].tolist() for i in range(len(ds))] == want
    assert ds.document_indices.tolist() == [0, 3]  # one document of three sentences


@pytest.mark.usefixtures("assets")
def test_split_sentences_without_punkt_names_the_fix(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    path = write_lines(tmp_path / "in.jsonl", [good("One. Two.")])
    with pytest.raises(preprocess_data.BadInputError, match="nltk.downloader punkt_tab"):
        run(path, tmp_path / "s", "--split-sentences")


@pytest.mark.usefixtures("assets")
def test_gpt2_bpe_matches_known_ids_and_uses_uint16(tmp_path):
    tok = build_tokenizer(
        "GPT2BPETokenizer",
        vocab_file=os.path.join(GPT2, "vocab.json"),
        merge_file=os.path.join(GPT2, "merges.txt"),
    )
    assert tok.encode("Hello world") == [15496, 995]  # the original GPT-2 encoder's ids
    assert (tok.eod, tok.vocab_size) == (50256, 50257)
    path = write_lines(tmp_path / "in.jsonl", [good("Hello world")])
    argv = ["--input", str(path), "--output-prefix", str(tmp_path / "g"), "--append-eod"]
    argv += [
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        os.path.join(GPT2, "vocab.json"),
    ]
    preprocess_data.main(argv + ["--merge-file", os.path.join(GPT2, "merges.txt")])
    ds = IndexedDataset(str(tmp_path / "g_text_document"))
    assert ds.index.dtype == np.uint16 and ds[0].tolist() == [15496, 995, 50256]


@pytest.mark.usefixtures("assets")
def test_tokenizer_decode_and_chat_template():
    tok = build_tokenizer("HuggingFaceTokenizer", QWEN3)
    ids = tok.encode("The answer is 42.")
    assert tok.decode(ids) == "The answer is 42."
    assert "".join(tok.token_text(i) for i in ids) == "The answer is 42."
    assert tok.encode("The answer is 42.", add_special_tokens=True) == ids  # Qwen3 has no BOS
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(messages, enable_thinking=False)
    text = tok.decode(prompt)
    assert text.startswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages, tokenize=False, enable_thinking=False) == text
    assert tok.token_text(prompt[0]) == "<|im_start|>"  # a special token, not its spelling


@pytest.mark.usefixtures("assets")
def test_eod_token_ours_or_megatron_lms_and_the_trainer_must_agree(tmp_path):
    """Default EOD is <|endoftext|>; --eod-token eos appends what Megatron-LM's tokenizer calls
    EOD (its HuggingFaceTokenizer.eod, the eos_token <|im_end|>); a trainer with the other EOD
    refuses the shard, one with the same EOD reads its document boundaries."""
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import (
        HuggingFaceTokenizer as MegatronHF,
    )

    from megatron_rmt.config import parse
    from megatron_rmt.data import check_eod, context_lengths
    from megatron_rmt.tokenizer import tokenizer_of

    bare = Tokenizer.from_file(os.path.join(QWEN3, "tokenizer.json"))
    path = write_lines(tmp_path / "in.jsonl", [good("One."), good("Two.")])
    run(path, tmp_path / "ours")
    run(path, tmp_path / "mlm", "--eod-token", "eos")
    ours = IndexedDataset(str(tmp_path / "ours_text_document"))
    mlm = IndexedDataset(str(tmp_path / "mlm_text_document"))
    assert ours[0][-1] == bare.token_to_id("<|endoftext|>")
    assert mlm[0][-1] == MegatronHF(QWEN3).eod == bare.token_to_id("<|im_end|>")

    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", QWEN3]
    default = tokenizer_of(parse(flags).data)
    eos = tokenizer_of(parse([*flags, "--eod-token", "eos"]).data)
    assert (default.eod, eos.eod) == (ours[0][-1], mlm[0][-1])
    with pytest.raises(ValueError, match="--eod-token eos"):
        check_eod([str(tmp_path / "mlm_text_document")], default)
    with pytest.raises(ValueError, match="--eod-token endoftext"):
        check_eod([str(tmp_path / "ours_text_document")], eos)
    check_eod([str(tmp_path / "mlm_text_document")], eos)
    window = torch.tensor([np.concatenate([mlm[0], mlm[1]]).tolist()])
    assert context_lengths(window, eos.eod)[0, len(mlm[0])] == 1  # doc 2 starts after the EOD


def _gpt2_argv(path, out):
    argv = ["--input", str(path), "--output-prefix", str(out / "corpus"), "--skip-bad-lines"]
    argv += ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", f"{GPT2_BUNDLED}/vocab.json"]
    return argv + ["--merge-file", f"{GPT2_BUNDLED}/merges.txt", "--append-eod"]


@pytest.mark.parametrize(
    "lines", [[], [b"", b"   "], [b'{"text": "  "}']], ids=["empty", "blank", "bad"]
)
def test_input_without_documents_is_an_error_and_writes_nothing(tmp_path, lines):
    path = write_lines(tmp_path / "in.jsonl", lines)
    with pytest.raises(preprocess_data.BadInputError, match=f"^{path}: no documents"):
        preprocess_data.main(_gpt2_argv(path, tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def test_input_without_documents_exits_with_one_line(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [b""])
    result = subprocess.run(
        [sys.executable, SCRIPT, *_gpt2_argv(path, tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=REPO),
    )  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]  # after the progress bar
    why = "no documents in the input (its lines: all blank)"
    assert last == f"error: {path}: {why}; no output written"
