"""Dreams in motion: keyframed zoom animations and coherent video.

``schedules`` (keyframed values as data), ``flow`` (optical flow, warps, occlusion masks, the
flicker metric), ``videoio`` (PyAV in and out, frame folders), ``animate`` (the feedback-zoom
loop) and ``video`` (every frame of a clip dreamed, carried along the flow). None imports Ray.
"""
