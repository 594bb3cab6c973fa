"""Evaluation: answers to question sets, LLM-as-a-judge, likelihood metrics and ratings from votes."""
