"""Data preparation CLIs for llmc: text in, GPT-2 token shards (llmc.data.shards) out.

    python -m data_tools.fineweb          FineWeb / FineWeb-Edu (hub) or local parquet/jsonl/txt
    python -m data_tools.tinyshakespeare  the bundled tiny-shakespeare (or any text file)
    python -m data_tools.hellaswag        the HellaSwag validation set -> an eval file for llmc.eval
    python -m data_tools.synthetic        random Zipf-like ids -> shards of any size (benchmarks)

`sources` reads documents, `sharder` tokenizes them on every core into resumable shards.
See data_tools/README.md for the flags and measured throughput.
"""
