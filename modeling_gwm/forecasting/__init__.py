"""Forecasting: GWMPipeline (the one batched forecasting core under forecast, forecast_quantiles, impute and
predict_df) and evaluation against baselines."""
