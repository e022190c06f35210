"""transformers continuous batching (generate_batch) served by cupy_paged, checked against
transformers' own paged sdpa path in the same run.

A Llama-architecture model from a small LlamaConfig with random weights (seeded, nothing is
downloaded) generates greedily for a few dozen requests of mixed prompt lengths, once with
transformers' default paged path ("sdpa") and once with cupy_paged's adapter
(``cupy_paged.integrations.transformers.prepare``). Both runs return each token's log-prob; the
check compares every request's tokens and, along the tokens the two runs share, their
log-probs. Prints tokens/s for both. Needs a CUDA GPU, torch and transformers >= 5: without
them it prints a one-line reason and exits 0.

    python examples/hf_continuous_batching.py [--requests 32] [--new-tokens 32] [--seed 0]
"""
import argparse
import sys
import time


def _missing():
    """Why this example cannot run here, or None."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        return f"needs torch and transformers >= 5 ({exc.name} is not installed)"
    if int(transformers.__version__.split(".")[0]) < 5:
        return f"needs transformers >= 5, found {transformers.__version__}"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch sees none)"
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no CuPy, or no driver for it
        return f"needs CuPy with a CUDA GPU ({type(exc).__name__}: {exc})"
    return None


def build_model(seed, layers=4, dtype="float16"):
    """A random-weight Llama (GQA: 8 query heads, 2 kv heads of 64) on the GPU, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).to(device="cuda", dtype=getattr(torch, dtype)).eval()
    return model


def make_prompts(seed, count, shortest=8, longest=300, vocab=2048):
    """``count`` prompts of random token ids with lengths in [shortest, longest]."""
    import numpy
    rng = numpy.random.default_rng(seed)
    lengths = rng.integers(shortest, longest + 1, size=count)
    return [rng.integers(3, vocab, size=int(n)).tolist() for n in lengths]


def generate(model, prompts, new_tokens):
    """Greedy generate_batch; returns ({request id: (tokens, logprobs)}, seconds)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                                  pad_token_id=0)
    # the same scheduling for both runs; no CUDA graphs, no async batching, no switch to
    # FlashAttention if it happens to be installed
    batching = ContinuousBatchingConfig(page_size=32, num_blocks=1024, max_batch_tokens=1024,
                                        return_logprobs=True, use_cuda_graph=False,
                                        use_async_batching=False, auto_switch_to_flash=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = model.generate_batch(prompts, generation_config=generation,
                                   continuous_batching_config=batching, progress_bar=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    failed = [key for key, out in outputs.items() if out.error is not None]
    if failed:
        raise RuntimeError(f"requests {failed[:4]} failed: {outputs[failed[0]].error}")
    return {key: (list(out.generated_tokens), list(out.logprobs))
            for key, out in outputs.items()}, seconds


def compare(reference, ours):
    """(requests with identical tokens, requests, max |logprob difference| over the shared
    token prefixes, tokens compared)."""
    same, worst, compared = 0, 0.0, 0
    for key, (tokens, logprobs) in reference.items():
        our_tokens, our_logprobs = ours[key]
        same += tokens == our_tokens
        shared = 0
        while shared < min(len(tokens), len(our_tokens)) and tokens[shared] == our_tokens[shared]:
            shared += 1
        # the log-prob of the first differing token still compares the same context
        upto = min(shared + 1, len(logprobs), len(our_logprobs))
        for a, b in zip(logprobs[:upto], our_logprobs[:upto]):
            worst = max(worst, abs(a - b))
        compared += upto
    return same, len(reference), worst, compared


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="max |log-prob difference| allowed (float16)")
    args = parser.parse_args(argv)
    reason = _missing()
    if reason:
        print(f"hf_continuous_batching: skipped: {reason}")
        return 0

    import transformers

    from cupy_paged.integrations import transformers as cpg_hf
    model = build_model(args.seed, layers=args.layers)
    prompts = make_prompts(args.seed, args.requests)
    warmup = prompts[:8]
    print(f"transformers {transformers.__version__}: {args.requests} requests, prompts of "
          f"{min(map(len, prompts))}..{max(map(len, prompts))} tokens, {args.new_tokens} new "
          f"tokens each, {args.layers} layers, float16")

    model.set_attn_implementation("sdpa")          # transformers' default paged path
    generate(model, warmup, 2)
    reference, reference_s = generate(model, prompts, args.new_tokens)

    name = cpg_hf.prepare(model)                   # cupy_paged's kernel, same model
    generate(model, warmup, 2)                     # compiles / loads our kernels once
    ours, ours_s = generate(model, prompts, args.new_tokens)

    total = sum(len(tokens) for tokens, _ in ours.values())
    print(f"transformers sdpa (paged): {total / reference_s:10.1f} tokens/s "
          f"({reference_s:.2f} s)")
    print(f"cupy_paged ({name}): {total / ours_s:10.1f} tokens/s ({ours_s:.2f} s)")
    same, count, worst, compared = compare(reference, ours)
    ok = worst <= args.tolerance and same >= 0.75 * count
    print(f"check: {same}/{count} requests generate identical tokens; max |logprob "
          f"difference| = {worst:.2e} over {compared} shared tokens "
          f"(tolerance {args.tolerance}): {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
