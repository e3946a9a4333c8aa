"""What each process reads, and what a resume costs, with TFDS text read through Grain
(config.data.tfds_reader=grain, scaling_sparse/data/grain_rows.py) against tf.data's in-order stream.

A synthetic text dataset (C4-like document lengths: 20-400 words) is stored twice as a real TFDS dataset,
as ArrayRecord (Grain) and TFRecord (tf.data). Measured:
  - records read per process for 1, 2 and 4 processes over the same global batches (counted at the
    TFDS data source; every process's iterator is built in this one process, as each host would);
  - the time from a saved position to the first batch (a new iterator, set_state, next) at a shallow
    and a deep position, for both readers: Grain seeks in O(1), tf.data skips the records read.

    python benchmarks/grain_reading.py            # JSON under benchmarks/results/
    python benchmarks/grain_reading.py --quick    # a small dataset (a smoke test)
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks import machine, reporting  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there all one been their we has would when if so no what more out up about "
         "into them can said time some could my than first only other new like then also two may").split()


def store(data_dir: pathlib.Path, records: int, file_format: str):
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)
    docs = [(i, {"text": " ".join(rng.choice(WORDS, int(rng.integers(20, 400))))}) for i in range(records)]
    return tfds.dataset_builders.store_as_tfds_dataset(
        name=f"bench_text_{file_format}", version="1.0.0",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        split_datasets={"train": docs, "validation": docs[:50]}, data_dir=str(data_dir), file_format=file_format,
        disable_shuffling=True)


class CountingSource:
    def __init__(self, source):
        self.source, self.reads = source, 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.reads += 1
        return self.source[i]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small dataset (a smoke test)")
    parser.add_argument("--out", default=str(RESULTS / f"grain_reading_{machine.machine_kind('cpu')}"))
    args = parser.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731

    from scaling_sparse.data import grain_rows, tfds_c4
    from scaling_sparse.data.tokenizer import train_tokenizer

    tfds_c4.import_tfds()
    records = 2_000 if args.quick else 20_000
    batch, seq_len = 8, 512
    steps = 20 if args.quick else 100
    # deep: near the end of the first epoch (about 19 records a step), where tf.data skips the most
    shallow, deep = (2, 90) if args.quick else (10, 1_000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        log(f"storing {records} records as ArrayRecord and TFRecord ...")
        array_builder, tf_builder = (store(tmp / "tfds", records, f) for f in ("array_record", "tfrecord"))
        source = array_builder.as_data_source(split="train")
        texts = (source[i]["text"].decode() for i in range(500))
        tokenizer = train_tokenizer(texts, 256, 2_000_000)

        # Records read per process: the same `steps` global batches on 1, 2 and 4 processes.
        reads = {}
        for count in (1, 2, 4):
            per = []
            for index in range(count):
                counted = CountingSource(source)
                it = grain_rows.RowStreamIterator(counted, tokenizer, batch, seq_len, seed=0, process_index=index,
                                                  process_count=count)
                for _ in range(steps):
                    next(it)
                per.append(counted.reads)
            reads[count] = per
            log(f"{count} process(es): records read per process {per} (total {sum(per)})")

        # Resume: time from a saved position to the first batch, shallow and deep, both readers.
        def grain_iterator():
            return grain_rows.RowStreamIterator(source, tokenizer, batch, seq_len, seed=0)

        open_records = tfds_c4.record_reader(tf_builder, "train")

        def tf_iterator():
            return tfds_c4.StreamIterator(open_records, tokenizer, batch, seq_len)

        resume = {}
        for name, make in (("grain", grain_iterator), ("tf.data", tf_iterator)):
            resume[name] = {}
            for label, position in (("shallow", shallow), ("deep", deep)):
                it = make()
                for _ in range(position):
                    next(it)
                state = it.get_state()
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    fresh = make()
                    fresh.set_state(state)
                    next(fresh)
                    times.append(time.perf_counter() - start)
                where = ({"row_records_min_max": [min(k for k, _ in state["rows"]), max(k for k, _ in state["rows"])]}
                         if "rows" in state else {k: v for k, v in state.items() if k != "fingerprint"})
                resume[name][label] = {"steps": position, "position": where,
                                       "seconds_median": statistics.median(times), "seconds": times}
                log(f"{name:8s} resume at step {position:5d} ({where}): {statistics.median(times) * 1e3:8.1f} ms "
                    f"(median of 3: {', '.join(f'{t * 1e3:.1f}' for t in times)})")

    result = {
        **reporting.run_header("grain_reading"),
        "dataset": {"records": records, "words_per_record": [20, 400], "batch_size": batch, "seq_len": seq_len},
        "records_read": {"steps": steps, "per_process": {str(k): v for k, v in reads.items()},
                         "fraction_of_one_process": {str(k): [r / sum(reads[1]) for r in v] for k, v in reads.items()}},
        "resume": resume,
        "method": "records counted at the TFDS data source; resume = new iterator + set_state + first batch, "
                  "median of 3, one process, the same machine and run for both readers",
    }
    reporting.write_json(pathlib.Path(args.out).with_suffix(".json"), result)
    return result


if __name__ == "__main__":
    main()
