#!/usr/bin/env python
"""Write the forecasting benchmark's extra series into configuration/data/ from the pip packages that ship them.

    pip install statsmodels pmdarima && python benchmarks/export_bench_data.py

Development time only (like configuration/data/extract.py): GWM and the benchmark read the CSVs written here. Every
file has a `date` column (ISO dates, the first day of the period) and one value column; see
configuration/data/README.md for origins and licences.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

DATA = Path(__file__).resolve().parent.parent / "configuration" / "data"


def _write(name: str, column: str, values, start: str, freq: str) -> None:
    values = pd.Series(values, dtype="float64").reset_index(drop=True)
    values = values.iloc[:values.last_valid_index() + 1]  # pmdarima's ausbeer ends with one empty value
    assert not values.isna().any(), name
    dates = pd.date_range(start, periods=len(values), freq=freq).strftime("%Y-%m-%d")
    pd.DataFrame({"date": dates, column: list(values)}).to_csv(DATA / name, index=False)


def main() -> None:
    import pmdarima.datasets as pm
    import statsmodels.api as sm

    # pmdarima copies of R series (base R `datasets`, `forecast`, `fpp`); values in pmdarima's order
    _write("airline_passengers_monthly.csv", "passengers", pm.load_airpassengers(), "1949-01-01", "MS")
    _write("wine_sales_australia_monthly.csv", "wine", pm.load_wineind(), "1980-01-01", "MS")
    _write("beer_production_australia_quarterly.csv", "beer", pm.load_ausbeer(), "1956-01-01", "QS")  # to 2008Q3
    _write("woollen_yarn_australia_quarterly.csv", "yarn", pm.load_woolyrnq(), "1965-01-01", "QS")
    _write("lynx_trappings_yearly.csv", "lynx", pm.load_lynx(), "1821-01-01", "YS")
    nile = sm.datasets.nile.load_pandas().data  # year, volume
    assert nile.year.diff().dropna().eq(1).all()
    _write("nile_flow_yearly.csv", "volume", nile.volume, f"{int(nile.year.iloc[0])}-01-01", "YS")


if __name__ == "__main__":
    main()
