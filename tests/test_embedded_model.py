"""The embedded SmolLM2-135M (GGUF Q4_1) against transformers' load of the same file, fp32 on CPU."""
import pytest
import torch

from model.perplexity import perplexity, window_nll, windows

PROMPT = ("The Eiffel Tower, completed in 1889 for the World's Fair, stands on the Champ de Mars "
          "in Paris. Its designer,")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_logits_match_transformers(embedded_fp32, hf_embedded):
    model, _ = embedded_fp32
    hf, tok = hf_embedded
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel(model(ids, last_only=False), ref) < 1e-3


def test_greedy_chat_decoding_matches_transformers(embedded_fp32, hf_embedded):
    model, _ = embedded_fp32
    hf, tok = hf_embedded
    text = tok.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    cache = model.new_cache()
    logits = model(ids, cache)
    ours = []
    for _ in range(32):
        nxt = int(logits[0, -1].argmax())
        ours.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache)
    assert ours == ref


@pytest.mark.slow
def test_perplexity_matches_transformers(embedded_fp32, hf_embedded, botchan_text):
    model, tokenizer = embedded_fp32
    hf, _ = hf_embedded
    ids = tokenizer.encode(botchan_text)
    ours = perplexity(model, ids, 512, 16, progress=False)
    total = n = 0
    for w in windows(ids, 512, 16):
        with torch.no_grad():
            nll, c = window_nll(hf(w.unsqueeze(0)).logits[0], w)
        total, n = total + nll, n + c
    ref = torch.tensor(total / n).exp().item()
    print(f"perplexity 16x512 Botchan: ours {ours:.4f}, transformers {ref:.4f}")
    assert abs(ours - ref) / ref < 1e-3
    assert 5 < ours < 60   # a sane language model on English prose
