"""Feeds Kafka with transactions: a simulator of the Fraud Detection Handbook's design, and file replay."""
