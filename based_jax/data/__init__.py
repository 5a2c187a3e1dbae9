"""Data for training and evaluation: the MQAR generator and the grain input pipelines."""
