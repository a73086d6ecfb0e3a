import numpy as np
import pandas as pd

frame = pd.DataFrame({"x": np.arange(3)})
print("hello from python", int(frame["x"].sum()) + 1)
