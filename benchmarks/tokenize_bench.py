"""Encode throughput: prefcli's tokenize path against a bare `tokenizers` encode_batch on the same file.

    python benchmarks/tokenize_bench.py [--mb 20] [--vocab-size 2048]

Both sides use the same trained tokenizer and the same documents. prefcli's side is the whole
`tokenize --tokenizer NAME` stage (reading, encoding, the train/val split, writing safetensors,
sealing the artifact with sha256); the bare side only reads the file and calls encode_batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from prefcli.stages.tokenize import ENCODE_BATCH, TokenizeConfig, run
from prefcli.workspace import Workspace


def make_corpus(path: Path, megabytes: float) -> None:
    from prefcli.data import demo

    target = int(megabytes * 1e6)
    docs, size = [], 0
    while size < target:
        for doc in demo.corpus_documents(seed=len(docs)):
            docs.append(doc)
            size += len(doc.encode()) + 2
            if size >= target:
                break
    path.write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        make_corpus(corpus, args.mb)
        nbytes = corpus.stat().st_size
        ws = Workspace(tmp / "ws")
        run(TokenizeConfig(input=[str(corpus)], vocab_size=args.vocab_size, dataset="first"), ws)
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(tmp / "ws/tokenizers/default/tokenizer.json"))

        def bare() -> None:
            docs = corpus.read_text().split("\n\n")
            for i in range(0, len(docs), ENCODE_BATCH):
                hf.encode_batch(docs[i : i + ENCODE_BATCH], add_special_tokens=False)

        def prefcli_path() -> None:
            run(TokenizeConfig(input=[str(corpus)], tokenizer="default", dataset="bench", overwrite=True), ws)

        best = {}
        for name, fn in (("tokenizers encode_batch", bare), ("prefcli tokenize", prefcli_path)):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[name] = min(times)
        print(f"corpus: {nbytes / 1e6:.1f} MB, vocabulary {args.vocab_size}, best of {args.repeats}")
        for name, t in best.items():
            print(f"{name:26s} {nbytes / 1e6 / t:8.2f} MB/s  ({t:.2f} s)")
        ratio = best["tokenizers encode_batch"] / best["prefcli tokenize"]
        print(f"prefcli / bare throughput: {ratio:.2f}  (target >= 0.80: lose less than 20%)")


if __name__ == "__main__":
    main()
