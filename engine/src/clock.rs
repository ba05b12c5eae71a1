//! Range vector clocks and the server clock gate (being written).
