"""What a person reads about a run: TensorBoard's summaries while it trains, the report/ folder and its page after
it, the label audit, and the progress bar."""
