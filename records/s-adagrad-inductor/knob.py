# the original adapter, one torch._inductor.config knob set (argv[1]=name, argv[2]=python value)
import sys, torch._inductor.config as ic
setattr(ic, sys.argv[1], eval(sys.argv[2]))
sys.argv = [sys.argv[0], "faithful", "4", "w1,b1,w2,b2", "1"]
import os
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "leaf.py")).read())
