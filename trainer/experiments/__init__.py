"""Experiments: commands that train several runs through the Trainer and report what they show."""
