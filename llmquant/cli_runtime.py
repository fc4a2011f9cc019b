"""``llmquant eval | generate | inspect``: measure and run dense models and quantized checkpoints."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from llmquant.cli_app import app, console, user_errors
from llmquant.errors import InputError

KERNEL_HELP = "auto | reference | dequant | int4 (auto: int4 on CPU for 4-bit layers, dequant otherwise)"
THREADS_HELP = "CPU threads for torch (0: torch's default); 1 is often faster on a machine shared with other jobs"


@contextlib.contextmanager
def _threads(threads: int):
    """Run with ``threads`` torch threads (0: leave as is), restoring the previous count."""
    if threads < 0:
        raise InputError(f"--threads {threads}: use 0 (default) or a positive count")
    import torch
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def _mb(n: int | float) -> str:
    return f"{n / 2**20:,.2f} MiB"


@app.command("eval")
@user_errors
def eval_cmd(
    model: str = typer.Option(..., "--model", help="checkpoint dir, HF model dir or .gguf file"),
    ppl: bool = typer.Option(False, "--ppl", help="measure perplexity (GPTQ paper protocol)"),
    dataset: str = typer.Option("wikitext2", "--dataset", help="wikitext2 | c4 | PATH (.txt/.raw/.jsonl/.parquet)"),
    seqlen: int = typer.Option(2048, "--seqlen", help="window length in tokens"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="evaluate at most N windows"),
    as_json: bool = typer.Option(False, "--json", help='print only {"ppl", "windows", "tokens"} on stdout'),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:i]"),
    kernel: str = typer.Option("auto", "--kernel", help=KERNEL_HELP),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (activations, dense parts)"),
    threads: int = typer.Option(0, "--threads", help=THREADS_HELP),
) -> None:
    """Perplexity of a dense or quantized model: text tokenized once, non-overlapping windows."""
    from llmquant.runtime.evaluate import evaluate_checkpoint
    if not ppl:
        raise InputError("nothing to evaluate: pass --ppl")
    console.print(f"loading {model}")
    with _threads(threads), _progress() as prog:
        task = prog.add_task("perplexity", total=None)

        def on_step(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        r = evaluate_checkpoint(model, dataset=dataset, seqlen=seqlen, max_windows=max_windows,
                                device=device, kernel=kernel, dtype=dtype, progress=on_step)
    if as_json:
        sys.stdout.write(json.dumps({"ppl": r["ppl"], "windows": r["windows"], "tokens": r["tokens"]}) + "\n")
        sys.stdout.flush()
        return
    t = Table(title=f"perplexity: {model}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in (("ppl", f"{r['ppl']:.4f}"), ("dataset", r["dataset"]), ("seqlen", r["seqlen"]),
                 ("windows", r["windows"]), ("tokens", r["tokens"]), ("kernel", r["kernel"]),
                 ("dtype", r["dtype"]), ("seconds", f"{r['seconds']:.1f}")):
        t.add_row(k, str(v))
    console.print(t)


@app.command("generate")
@user_errors
def generate_cmd(
    model: str = typer.Option(..., "--model", help="checkpoint dir, HF model dir or .gguf file"),
    prompt: str = typer.Option(..., "--prompt", help="text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the tokenizer's chat template"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:i]"),
    kernel: str = typer.Option("auto", "--kernel", help=KERNEL_HELP),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    threads: int = typer.Option(0, "--threads", help=THREADS_HELP),
) -> None:
    """Stream a continuation of --prompt to stdout; prefill and decode tokens/s go to stderr."""
    from llmquant.runtime.evaluate import load_tokenizer_for
    from llmquant.runtime.generate import generate_stream
    from llmquant.runtime.loader import load

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with _threads(threads):
        tok = load_tokenizer_for(model)
        with console.status(f"loading {model}"):
            m = load(model, device=device, dtype=dtype, kernel=kernel)
        r = generate_stream(m, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature, on_text=emit,
                            chat=chat, seed=seed)
    sys.stdout.write("\n")
    sys.stdout.flush()
    console.print(f"prefill: {r['prompt_tokens']} tokens in {r['prefill_s']:.3f} s ({r['prefill_tok_s']:.1f} tok/s); "
                  f"decode: {r['new_tokens'] - 1} tokens in {r['decode_s']:.3f} s ({r['decode_tok_s']:.1f} tok/s)",
                  highlight=False)


@app.command("inspect")
@user_errors
def inspect_cmd(
    path: str = typer.Argument(..., help="checkpoint directory"),
    plot: Optional[str] = typer.Option(None, "--plot", help="PNG path (default: quant_report.png next to the report)"),
    top: int = typer.Option(20, "--top", help="list the N modules with the largest loss (0 = all)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout"),
) -> None:
    """Bits, group size, format, sizes (quantized vs dense fp16) and per-layer error with a bar chart."""
    from llmquant.runtime.inspect import inspect_checkpoint, plot_layer_errors
    info = inspect_checkpoint(path)
    png = None
    if info["modules"]:
        target = Path(plot) if plot else Path(path) / "quant_report.png"
        png = plot_layer_errors(info["modules"], target, title=f"error per layer: {Path(path).name}")
        info["plot"] = str(png) if png else None
    if as_json:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
        return
    t = Table(title=f"checkpoint {info['path']}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k in ("model_type", "quant_method", "bits", "group_size", "format", "desc_act", "sym", "n_quantized",
              "n_tensors"):
        if k in info:
            t.add_row(k, str(info[k]))
    t.add_row("weights on disk", _mb(info["weight_bytes"]))
    t.add_row("dense fp16 equivalent", _mb(info["dense_fp16_bytes"]))
    if info["dense_fp16_bytes"]:
        t.add_row("ratio (disk / fp16)", f"{info['weight_bytes'] / info['dense_fp16_bytes']:.3f}")
    if info["quantized_linear_fp16_bytes"]:
        t.add_row("quantized linears", f"{_mb(info['quantized_linear_bytes'])} vs {_mb(info['quantized_linear_fp16_bytes'])} "
                  f"fp16 ({info['quantized_linear_bytes'] / info['quantized_linear_fp16_bytes']:.3f}x)")
    console.print(t)
    mods = info["modules"]
    if not mods:
        console.print(f"no per-layer report ({Path(path) / 'quant_report.json'} missing or without 'modules')")
        return
    shown = sorted(mods, key=lambda m: -(m["loss"] if m["loss"] is not None else -1))
    if top > 0:
        shown = shown[:top]
    lt = Table(title=f"per-layer loss ({len(shown)} of {len(mods)}, largest first)")
    for col in ("module", "loss", "damp", "fallback", "seconds"):
        lt.add_column(col, justify="left" if col == "module" else "right")
    for m in shown:
        lt.add_row(m["name"], "-" if m["loss"] is None else f"{m['loss']:.5g}",
                   "-" if m["damp"] is None else f"{m['damp']}", str(m["fallback"] or "-"),
                   "-" if m["seconds"] is None else f"{m['seconds']:.2f}")
    console.print(lt)
    if png:
        console.print(f"chart: {png}")
