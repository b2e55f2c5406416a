"""Where a compiled decode step's time goes: host or GPU. For AR's decoder and Cerberus's (shipped heads, sparse64
tree, always parallel), each compiled as bench.py --compile does, it prints the wall time of a step with dynamo's
guards all checked and only those that tell the graphs apart (what bench.py times), the device time of the kernels
a step ran (torch.profiler), and the operations that took the most time.

    python results/profile_step.py                  # CUDA if there is one, bfloat16 there, float32 on a CPU
"""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cerberus import Decoder, Tree, load_heads  # noqa: E402
from model import chat_prompt, load_smollm2  # noqa: E402

QUESTION, N_TOKENS = "Explain how a refrigerator keeps food cold, step by step.", 128


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def main():
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    model, tokenizer = load_smollm2()
    model = model.to(device, dtype).eval()
    heads = load_heads(os.path.join(os.path.dirname(__file__), "..", "heads", "cerberus.pt"), model)[0].to(dtype)
    prompt = chat_prompt(tokenizer, QUESTION)
    decoders = {"ar": Decoder(model, max_len=512), "cerberus": Decoder(model, heads, Tree.preset("sparse64"), max_len=512)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'} | dtype {dtype} | torch {torch.__version__} | "
          f"prompt {len(prompt)} tokens | {N_TOKENS} new")
    for name, decoder in decoders.items():
        decoder.compile("reduce-overhead" if cuda else "default")
        for _ in range(3):  # compile, then record the CUDA graphs
            decoder.generate(prompt, 16)
        for skip_guards in (False, True):  # every graph is compiled: all guards, or only those telling them apart
            with torch.compiler.set_stance(skip_guard_eval_unsafe=skip_guards):
                sync(device)
                start = time.perf_counter()
                decoder.prefill(torch.tensor(prompt, device=device))
                sync(device)
                prefill_s, start = time.perf_counter() - start, time.perf_counter()
                stats = decoder.generate(prompt, N_TOKENS)[1]
                sync(device)
                step_ms = 1e3 * (time.perf_counter() - start - prefill_s) / stats.steps
                with profile(activities=activities) as prof:
                    decoder.generate(prompt, N_TOKENS)
                    sync(device)
            events = prof.key_averages()
            lookup = [e for e in events if e.key == "TorchDynamo Cache Lookup"]
            device_ms = sum(e.self_device_time_total for e in events) / 1e3 / stats.steps if cuda else float("nan")
            print(f"{name}{', checking only the guards that tell graphs apart' if skip_guards else ', all guards'}: "
                  f"prefill {1e3 * prefill_s:.2f} ms; {stats.steps} steps, tau {stats.new_tokens / stats.steps:.2f}, "
                  f"wall {step_ms:.3f} ms a step; profiled: dynamo's guards {lookup[0].cpu_time_total / lookup[0].count:.0f} "
                  f"us a call, kernels {device_ms:.3f} ms a step")
        print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=12,
                           max_name_column_width=60))


if __name__ == "__main__":
    main()
