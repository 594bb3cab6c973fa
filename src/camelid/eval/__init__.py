"""Evaluation: answers to question sets, LLM-as-a-judge, likelihood metrics and ratings from votes.

The multiple-choice options of camelid.eval.likelihood are named here, where importing them loads no torch, so
that `camelid eval choice --help` can list them.
"""

PROMPT = "Question: {question}\nAnswer:"  # lm-eval's ARC prompt; the choice follows after likelihood.DELIMITER
NORMALISATIONS = ("chars", "bytes", "tokens", "none")  # what acc_norm divides a choice's log-likelihood by
