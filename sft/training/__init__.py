"""Training: Trainer wired to the config, data and model, with callbacks for what Trainer lacks."""
