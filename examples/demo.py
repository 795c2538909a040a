"""mpckv demo: one prompt, several KV methods side by side, then the same prompt privately under MPC.

Runs on the shipped tiny model when it is present (``mpckv.load_model("tiny")``); otherwise on a small
random-weight Llama written to a temporary directory, and says so. Part 1 prints, per method, the kept
cache fraction, the fraction read per step, cache bytes, timings and the generated text; when the real
model ``smollm2`` is installed, dense and SnapKV (20 %) then answer a passkey prompt in its chat template
(a few seconds; ``--no-real`` skips it). Part 2 launches
two CrypTen parties (party 0 holds the weights, party 1 the prompt) for a short private greedy generation
and prints its tokens, time and communication next to the plaintext run of the same prompt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mpckv
from mpckv.errors import CheckpointError

METHODS = [
    ("dense", {}),
    ("streamingllm", {"budget": 0.2, "sinks": 4}),
    ("h2o", {"budget": 0.2}),
    ("h2o_window", {"budget": 0.2, "window": 16}),
    ("snapkv", {"budget": 0.2, "window": 16}),
    ("pyramidkv", {"budget": 0.2, "window": 16}),
    ("quest", {"budget": 0.2, "page_size": 16}),
    ("mpcache", {"budget": 0.2}),
    ("razorattention", {"budget": 0.2}),  # shipped retrieval-head calibration for tiny
    ("trimkv", {"budget": 0.2}),  # shipped retention gates for tiny
]


def _model_dir(tmp: Path) -> tuple[str, bool]:
    try:
        mpckv.load_model("tiny")
        return "tiny", True
    except CheckpointError:
        from mpckv.random_model import random_llama, small_config

        cfg = small_config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, head_dim=16)
        mpckv.save_model(random_llama(cfg, std=0.1, embed_std=0.1, norm_std=0.0), tmp / "random")
        return str(tmp / "random"), False


def _plaintext(model_dir: str, prompt: str, new: int) -> None:
    model = mpckv.load_model(model_dir)
    ids = mpckv.ByteTokenizer().encode(prompt)
    print(f"prompt: {len(ids)} tokens, model: {model.num_parameters():,} parameters\n")
    print(
        f"{'method':<13} {'kept':>6} {'read':>6} {'cache KB':>9} {'prefill ms':>10} {'decode ms':>9}  output"
    )
    available = {m.name for m in mpckv.list_methods()}
    tok = mpckv.ByteTokenizer()
    for name, params in METHODS:
        if name not in available:
            continue
        res = mpckv.Engine(model, name, **params).generate([ids], new, stop_tokens=[])
        st = res.stats
        dense_len = len(ids) + max(new - 1, 0)
        read = sum(st.read_per_layer) / (len(st.read_per_layer) * dense_len)
        text = tok.decode(res.tokens[0]).replace("\n", "\\n")
        print(
            f"{name:<13} {st.kept_fraction:>6.2f} {read:>6.2f} {st.live_cache_bytes / 1024:>9.1f} "
            f"{st.prefill_s * 1e3:>10.1f} {st.decode_s * 1e3:>9.1f}  {text!r}"
        )


def _real_model(name: str = "smollm2", new: int = 12) -> None:
    """Dense and SnapKV (20 %) on an installed real model, passkey prompt in its chat template."""
    from mpckv.models import model_status

    if not model_status(name)["installed"]:
        print(f"\n(real model {name!r} is not installed: `make install` adds it; skipping that part)")
        return
    model = mpckv.load_model(name)
    tok = mpckv.load_tokenizer(model.source, model.config.vocab_size)
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    context = filler * 6 + "The pass key is 68219. Remember it. 68219 is the pass key. " + filler * 6
    question = "What is the pass key? Answer with the number only."
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": context + "\n\n" + question}]))
    print(
        f"\nreal model {name} ({model.num_parameters():,} parameters): {len(ids)}-token passkey prompt "
        "in its chat template, expected 68219"
    )
    for method, params in [("dense", {}), ("snapkv", {"budget": 0.2, "window": 16})]:
        res = mpckv.Engine(model, method, **params).generate([ids], new, stop_tokens=tok.stop_token_ids)
        st = res.stats
        text = tok.decode(res.tokens[0]).replace("\n", "\\n")
        print(
            f"{method:<13} kept {st.kept_fraction:>5.2f}  prefill {st.prefill_s:5.2f} s  "
            f"decode {st.decode_s:5.2f} s  {text!r}"
        )


def _secure(model_dir: str, prompt: str, new: int, tmp: Path) -> int:
    out = tmp / "secure.json"
    cmd = [
        sys.executable,
        "-m",
        "mpckv",
        "launch",
        "--parties",
        "2",
        "--",
        "generate",
        "--secure",
        "--model",
        model_dir,
        "--prompt",
        prompt,
        "--max-new-tokens",
        str(new),
        "--out",
        str(out),
    ]
    print(
        f"\n$ mpckv launch --parties 2 -- generate --secure --model {model_dir} --prompt {prompt!r} "
        f"--max-new-tokens {new}"
    )
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
        return proc.returncode
    sec = json.loads(out.read_text())
    plain = mpckv.Engine(mpckv.load_model(model_dir)).generate([list(prompt.encode())], new, stop_tokens=[])
    c = sec["comm"]
    print(f"{'run':<10} {'tokens':<40} {'seconds':>8} {'MiB':>8} {'rounds':>7} {'LAN s':>7} {'WAN s':>7}")
    print(
        f"{'plaintext':<10} {str(plain.tokens[0]):<40} "
        f"{plain.stats.prefill_s + plain.stats.decode_s:>8.3f} {'-':>8} {'-':>7} {'-':>7} {'-':>7}"
    )
    print(
        f"{'2PC':<10} {str(sec['tokens']):<40} {sec['wall_s']:>8.2f} {c['bytes_total'] / 2**20:>8.2f} "
        f"{c['rounds']:>7} {c['modelled']['lan_s']:>7.2f} {c['modelled']['wan_s']:>7.2f}"
    )
    same = "identical" if sec["tokens"] == plain.tokens[0] else "DIFFERENT"
    print(f"secure and plaintext tokens are {same}; only party 1 (the prompt owner) saw them.")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--secure-tokens", type=int, default=4, help="tokens to generate under MPC")
    ap.add_argument("--no-secure", action="store_true", help="skip the private generation")
    ap.add_argument("--no-real", action="store_true", help="skip the real-model part (smollm2)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model_dir, trained = _model_dir(tmp)
        if trained:
            from mpckv.data.synthetic import make_sample

            sample = make_sample("passkey", 1024, seed=7)
            prompt = sample.context + "\n\n" + sample.question
            print(f"task: passkey retrieval in 1 KiB of text; expected answer {sample.answer.strip()!r}\n")
        else:
            print("note: the shipped tiny model is not present; using random weights (text will be noise)\n")
            prompt = "mpckv keeps the KV cache small. " * 12
        _plaintext(model_dir, prompt, args.max_new_tokens)
        if not args.no_real:
            _real_model()
        if args.no_secure:
            return 0
        secret = "The pass key is 70513. Remember it.\n\nWhat is the pass key? The pass key is"
        return _secure(model_dir, secret, args.secure_tokens if not trained else 6, tmp)


if __name__ == "__main__":
    sys.exit(main())
