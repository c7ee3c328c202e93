"""One evaluator for every figure (predict once, COCO mAP, detection rate), the gate rules,
the gate's record and report."""
