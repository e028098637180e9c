"""Train the tiny fixtures committed under mla_plugin/fixtures/trained/ (the packaged demo model,
deepseek-v2-tiny) and tests/fixtures/trained/ (the tests' llama-gqa-tiny and deepseek-v2-tiny-ratio8).

    python scripts/train_tiny_fixtures.py deepseek   # DeepSeek-V2 (MLA), 512 + 64 latent, 8 heads
    python scripts/train_tiny_fixtures.py llama      # Llama, GQA: 8 query heads, 2 KV heads
    python scripts/train_tiny_fixtures.py deepseek-ratio8 --threads 1
        # DeepSeek-V2, 128 + 32 latent, 8 heads of 64 + 64: H (d_nope + d_v) / d_c = 8 as V2-Lite

Seeded and deterministic on CPU (fixed step count, fixed data order). Trained on the
wikitext-2 *validation* tokens (../shared/data/wikitext-2/valid.tokens.txt) only, never
on the test split; the last 2% of it is held out to report a dev loss (and to calibrate the
fixtures on: mla_plugin/fixtures/training_text.py). Weights are
stored in bfloat16 (the fixtures are evaluated in float32 from those values) to keep
the two under 40 MB together. About 15 minutes (DeepSeek) and 10 minutes (Llama) on 2 otherwise idle cores
(34 minutes measured for DeepSeek while other work shared the cores).
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mla_plugin.fixtures.tiny_models import _token_ids, load_tokenizer, tiny_deepseek_v2_config
from mla_plugin.fixtures.training_text import fixture_token_ids, training_token_count

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared/data/wikitext-2/valid.tokens.txt"
OUT_ROOT = REPO / "mla_plugin/fixtures/trained"  # the packaged fixture
TEST_OUT_ROOT = REPO / "tests/fixtures/trained"  # the test-only ones

ARCHS = {
    "deepseek": "deepseek-v2-tiny",
    "llama": "llama-gqa-tiny",
    # H (d_nope + d_v) / d_c = 8 (8 x 128 / 128), DeepSeek-V2-Lite's ratio (16 x 256 / 512): a
    # head group can use more latent directions than its d_c/g slice (issue 16)
    "deepseek-ratio8": "deepseek-v2-tiny-ratio8",
}


def build_model(arch: str, tokenizer, max_positions: int):
    from transformers import DeepseekV2ForCausalLM, LlamaConfig, LlamaForCausalLM

    if arch == "deepseek":
        config = tiny_deepseek_v2_config(
            tokenizer=tokenizer, kv_lora_rank=512, qk_rope_head_dim=64, num_heads=8, num_layers=4,
            hidden_size=256, qk_nope_head_dim=32, v_head_dim=32, intermediate_size=640,
            max_position_embeddings=max_positions, initializer_range=0.02,
        )
        return DeepseekV2ForCausalLM(config)
    if arch == "deepseek-ratio8":
        config = tiny_deepseek_v2_config(
            tokenizer=tokenizer, kv_lora_rank=128, qk_rope_head_dim=32, num_heads=8, num_layers=4,
            hidden_size=256, qk_nope_head_dim=64, v_head_dim=64, intermediate_size=640,
            max_position_embeddings=max_positions, initializer_range=0.02,
        )
        return DeepseekV2ForCausalLM(config)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=max_positions,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02, **_token_ids(tokenizer),
    )
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", choices=sorted(ARCHS))
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--out", type=Path,
                        help="default: mla_plugin/fixtures/trained/deepseek-v2-tiny (packaged), "
                             "else tests/fixtures/trained/<name>")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if "test" in args.text.name:
        parser.error("never train on the test split")
    out = args.out or (OUT_ROOT if args.arch == "deepseek" else TEST_OUT_ROOT) / ARCHS[args.arch]

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    ids = torch.tensor(fixture_token_ids(tokenizer, args.text.read_text()))
    split = training_token_count(len(ids))  # the rest is held out: the fixtures' calibration text
    train, dev = ids[:split], ids[split:]
    print(f"{args.arch}: {len(train)} training tokens, {len(dev)} held out")

    model = build_model(args.arch, tokenizer, max_positions=2048).float().train()
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    from tqdm import tqdm

    bar = tqdm(range(args.steps), desc=f"train {args.arch}")
    for step in bar:
        starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train[s : s + args.seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    minutes = (time.time() - start) / 60

    model.eval()
    with torch.no_grad():
        windows = dev[: len(dev) // args.seq_len * args.seq_len].view(-1, args.seq_len)
        dev_loss = sum(model(w[None], labels=w[None]).loss.item() for w in windows) / len(windows)
    print(f"dev loss {dev_loss:.4f} (ppl {math.exp(dev_loss):.2f}) after {args.steps} steps, {minutes:.1f} min")

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({
        "arch": args.arch, "seed": args.seed, "steps": args.steps, "batch": args.batch,
        "seq_len": args.seq_len, "lr": args.lr, "parameters": params,
        "train_text": "wikitext-2 valid.tokens.txt (first 98%)", "dev_loss": dev_loss,
        "dev_ppl": math.exp(dev_loss), "train_minutes": round(minutes, 1),
        "stored_dtype": "bfloat16", "script": "scripts/train_tiny_fixtures.py",
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
