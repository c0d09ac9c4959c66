"""Reference ROUGE-L (rouge-score's LCS dynamic program, written out) and random near-duplicate texts."""

from __future__ import annotations

import random

from sft_pipeline.text_metrics import rouge_tokens


def dp_lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def reference_f1(a: str, b: str) -> float:
    # rouge-score's _score_lcs, written out: precision over the prediction, recall over the target.
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    if not ta or not tb:
        return 0.0
    lcs = dp_lcs(ta, tb)
    p, r = lcs / len(tb), lcs / len(ta)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = ("a the of to write explain list give three tips for how why what is are cat dog sea poem story "
             "code python summarize classify sentence review positive negative short long about").split()
    texts = []
    for _ in range(n):
        if texts and rng.random() < 0.4:  # a near copy of an earlier text
            words = rng.choice(texts).split()
            for _ in range(rng.randint(0, 3)):
                i = rng.randrange(len(words) + 1)
                if rng.random() < 0.5 and words:
                    words.pop(min(i, len(words) - 1))
                else:
                    words.insert(i, rng.choice(vocab))
            texts.append(" ".join(words) or "empty")
        else:
            texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 16))))
    return texts
