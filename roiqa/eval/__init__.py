"""Evaluation: metrics, classical baselines, the demo and evaluation collections, report tables and plots."""
