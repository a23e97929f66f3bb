"""Running models and spreading work: the one place that knows how mixquant executes."""
