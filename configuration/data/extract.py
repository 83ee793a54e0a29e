"""Re-create the shipped CSVs from the public-domain datasets that statsmodels ships (development time only).

    pip install statsmodels && python configuration/data/extract.py

The runtime never imports statsmodels: GWM reads the CSVs written here.
"""

from pathlib import Path

import pandas as pd
import statsmodels.api as sm

HERE = Path(__file__).resolve().parent


def main() -> None:
    macro = sm.datasets.macrodata.load_pandas().data
    macro.insert(0, "date", pd.PeriodIndex.from_fields(year=macro.year.astype(int), quarter=macro.quarter.astype(int),
                                                       freq="Q").to_timestamp().strftime("%Y-%m-%d"))
    macro = macro[["date", "realgdp", "realcons", "realinv", "cpi", "tbilrate", "unemp", "infl"]]
    macro.to_csv(HERE / "us_macro_quarterly.csv", index=False)

    co2 = sm.datasets.co2.load_pandas().data  # weekly flask samples, Mauna Loa
    co2 = co2["co2"].resample("MS").mean().dropna().round(3)
    co2.rename_axis("date").reset_index().assign(date=lambda d: d.date.dt.strftime("%Y-%m-%d")).to_csv(
        HERE / "co2_mauna_loa_monthly.csv", index=False)

    nino = sm.datasets.elnino.load_pandas().data.melt(id_vars="YEAR", var_name="month", value_name="sst")
    months = {m: i for i, m in enumerate(["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV",
                                          "DEC"], start=1)}
    nino["date"] = pd.to_datetime(dict(year=nino.YEAR.astype(int), month=nino.month.map(months), day=1))
    nino = nino.sort_values("date")[["date", "sst"]].assign(date=lambda d: d.date.dt.strftime("%Y-%m-%d"))
    nino.to_csv(HERE / "elnino_nino12_monthly.csv", index=False)

    sun = sm.datasets.sunspots.load_pandas().data
    sun = pd.DataFrame({"date": sun.YEAR.astype(int).astype(str) + "-01-01", "sunactivity": sun.SUNACTIVITY})
    sun.to_csv(HERE / "sunspots_yearly.csv", index=False)


if __name__ == "__main__":
    main()
