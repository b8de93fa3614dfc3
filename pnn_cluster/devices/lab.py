"""Each simulated system's lab: what walks with the lab's temperature, how fast, and how fast the real setup
measures (:class:`~pnn_cluster.devices.simulated.LabDrift`; how a rate becomes ``Imperfections.drift`` is told
in :mod:`pnn_cluster.devices.simulated`). One table, read by each system's class (its ``lab_drift``):

    ============ ============ ========== ========== ===========================================
    system       spread per   samples/s  drift (per what walks; what limits the sample rate
                 sqrt(hour)              10,000)
    ============ ============ ========== ========== ===========================================
    shg          0.2          20         0.075      a free-running ultrafast laser's power and
                                                    centre wavelength; liquid-crystal shaper
                                                    settling and spectrometer integration
    plate        0.11         15         0.047      voice-coil resistance, microphone
                                                    sensitivity, plate modulus; ring-down
                                                    between waveforms
    circuit      0.11         1000       0.0058     Schottky saturation current and thermal
                                                    voltage; AWG sequence and scope readout
    oscillators  0.02         0.3        0.061      pivot-bearing damping, spring modulus; a
                                                    2 s swing and a reset per sample
    ============ ============ ========== ========== ===========================================
"""

from __future__ import annotations

from pnn_cluster.devices.simulated import LabDrift

__all__ = ["LABS"]

LABS: dict[str, LabDrift] = {
    "shg": LabDrift(
        per_sqrt_hour=0.2, samples_per_s=20.0,
        reason="a free-running ultrafast oscillator's power walks about 0.5 %/sqrt(h) (0.17 of the bin gains' 3 % "
               "spread) and its centre wavelength about 0.1 pixel/sqrt(h) (0.2 of the envelope centre's 0.5 pixel); "
               "the shaper's liquid crystal and the crystal's phase matching follow the lab's ~1 K/sqrt(h). "
               "Rate: the liquid-crystal shaper settles in ~30 ms and the spectrometer integrates ~20 ms, 20 "
               "samples/s",
    ),
    "plate": LabDrift(
        per_sqrt_hour=0.11, samples_per_s=15.0,
        reason="with the lab walking ~1 K/sqrt(h): the voice coil's copper resistance (+0.39 %/K) sets the force per "
               "volt (0.11 of the coupling's 3.5 % spread per K), an electret microphone's sensitivity moves ~0.3 %/K "
               "(0.09 of the mic gain's), the plate's modulus (-4.5e-4/K in aluminium) shifts the resonances "
               "-2.2e-4/K (0.02 of their 1 %). Rate: an 8 ms waveform, then ~60 ms for the slowest mode (zeta 0.05 "
               "at 350 Hz) to ring down before the next, 15 samples/s",
    ),
    "circuit": LabDrift(
        per_sqrt_hour=0.11, samples_per_s=1000.0,
        reason="with the lab walking ~1 K/sqrt(h): the Schottky diode's saturation current grows ~8 %/K "
               "(2/T + phi_B/(V_T T), phi_B 0.6 V: 0.11 of log_is's 0.7 spread per K) and the thermal voltage "
               "0.33 %/K, which the model's fixed V_T sees as ideality (0.07 of its spread); R, L and C "
               "(~100 ppm/K) and the scope (~50 ppm/K) add little. Rate: a 36 us window; a batch of waveforms as "
               "one AWG sequence, captured in a segmented-memory scope and read out over LAN, ~1000 samples/s",
    ),
    "oscillators": LabDrift(
        per_sqrt_hour=0.02, samples_per_s=0.3,
        reason="with the lab walking ~1 K/sqrt(h): the pivot bearings' grease thins with temperature, moving the "
               "damping ~0.5 %/K (0.02 of its 0.08 /s spread per K); the springs' steel modulus (-2.5e-4/K) moves "
               "their stiffness 0.008 of its 3 % spread; the pendula's lengths (1e-5/K) hardly move. Rate: a 2 s "
               "swing, then ~1.3 s for the actuators to catch the pendula and set the next angles, 0.3 samples/s",
    ),
}
