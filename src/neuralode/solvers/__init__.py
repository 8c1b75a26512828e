"""Steppers: one generic explicit Runge-Kutta stepper (implicit ones for stiff problems later)."""

from .rk import RKStepper

__all__ = ["RKStepper"]
